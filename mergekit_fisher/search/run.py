"""Run a search: merge every candidate through mergekit, score it per source, keep the best.

Every candidate goes through ``run_merge`` (the ``mergekit-yaml`` code path) into a scratch
directory, merged ahead of its scoring in worker processes (``search.ahead``). The tokenized
samples are shared; each candidate costs one merge and one forward pass over the samples, or
over a quarter of them when racing (``search.race``) shows it losing. Merges run with
``random_seed`` 0 unless told otherwise, so DARE's random drops are the same on every run.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergekit_fisher.data import CalibrationData
from mergekit_fisher.search.ahead import Merged, default_workers, merged_ahead
from mergekit_fisher.search.candidates import (
    Candidate,
    SearchError,
    candidates_for,
    edge_warnings,
)
from mergekit_fisher.search.methods import method_candidates
from mergekit_fisher.search.race import PRUNE_BELOW, chance_ahead, split_rows
from mergekit_fisher.search.score import RowScores, SourceLoss, load_samples, objective, score_rows

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """A candidate with its per-source losses, objective and merge+score time; ``pruned``:
    scored on the first rows only (racing), never picked."""

    candidate: Candidate
    losses: tuple[SourceLoss, ...]
    loss: float  # the objective
    seconds: float
    tiebreak: float = 0.0  # the ``tasks`` loss, which orders candidates the objective ties
    pruned: bool = False

    @property
    def weights(self) -> tuple[float, ...]:
        return self.candidate.weights

    def label(self) -> str:
        return self.candidate.label


@dataclass
class SearchResult:
    candidates: list[Scored]
    best: Scored
    best_recipe: dict[str, Any]
    seconds: float
    sample_tokens: int
    objective: str
    samples: dict[str, CalibrationData]
    merge_workers: int = 0


@dataclass(frozen=True)
class Scoring:
    """How candidates are scored: the samples and the settings every candidate shares."""

    samples: dict[str, CalibrationData]
    pad_id: int
    batch_size: int
    device: str
    objective: str
    prune: bool = True


@dataclass
class Race:
    """Scores candidates in two steps, the first rows (``split_rows``) and the rest, and keeps
    the incumbent's first-row scores to stop a candidate that is clearly behind."""

    scoring: Scoring
    first: dict[str, list[int]] = field(init=False)
    rest: dict[str, list[int]] = field(init=False)
    incumbent: tuple[Scored, dict[str, RowScores]] | None = None

    def __post_init__(self) -> None:
        split = {s: split_rows(len(d.examples)) for s, d in self.scoring.samples.items()}
        self.first = {s: first for s, (first, _) in split.items()}
        self.rest = {s: rest for s, (_, rest) in split.items()}

    def score(self, candidate: Candidate, merged: Merged) -> Scored:
        """Score one merged candidate (the first rows, then the rest unless it is behind)."""
        started = time.perf_counter()
        model = _load(merged.path, self.scoring.device)
        first = self._rows(model, self.first)
        behind = self._behind(first)
        rows = first if behind else _joined(first, self._rows(model, self.rest))
        del model
        losses = tuple(rows[source].loss(source) for source in self.scoring.samples)
        scored = Scored(
            candidate,
            losses,
            objective(losses, self.scoring.objective),
            merged.seconds + time.perf_counter() - started,
            objective(losses, "tasks"),
            pruned=behind,
        )
        if not behind and (
            self.incumbent is None or rank_key(scored) < rank_key(self.incumbent[0])
        ):
            self.incumbent = (scored, first)
        return scored

    def _rows(self, model: torch.nn.Module, rows: Mapping[str, list[int]]) -> dict[str, RowScores]:
        s = self.scoring
        return {
            source: score_rows(
                model, [data.examples[i] for i in rows[source]], s.pad_id, s.batch_size
            )
            for source, data in s.samples.items()
            if rows[source]
        }

    def _behind(self, first: Mapping[str, RowScores]) -> bool:
        if not self.scoring.prune or self.incumbent is None or not any(self.rest.values()):
            return False
        return chance_ahead(first, self.incumbent[1], self.scoring.objective) < PRUNE_BELOW


def _joined(first: Mapping[str, RowScores], rest: Mapping[str, RowScores]) -> dict[str, RowScores]:
    return {s: first[s] + rest[s] if s in rest else first[s] for s in first}


def _load(path: Path, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


def rank_key(scored: Scored) -> tuple[bool, bool, float, bool, float]:
    """Candidates scored in full first; lowest objective first, ties (common under ``exact``)
    by the ``tasks`` loss; NaN last."""
    return (
        scored.pruned,
        math.isnan(scored.loss),
        scored.loss,
        math.isnan(scored.tiebreak),
        scored.tiebreak,
    )


def best_of(scored: Sequence[Scored]) -> Scored:
    """The lowest objective, ties broken by the ``tasks`` loss (a NaN objective never wins,
    nor does a pruned candidate)."""
    return min(scored, key=rank_key)


def _candidates(
    recipe: Mapping[str, Any], grid: Mapping[str, list[Any]] | None, methods: Sequence[str] | None
) -> list[Candidate]:
    """``--methods``: a default grid per method; else the ``--grid`` of the recipe's method."""
    if methods and grid:
        raise SearchError(
            "--grid searches the recipe's own method, --methods a default grid per method: "
            "use one of them"
        )
    return method_candidates(recipe, methods) if methods else candidates_for(recipe, grid or {})


def _scoring(candidates: Sequence[Candidate], data: Sequence[str], **settings: Any) -> Scoring:
    """Tokenize the samples once, with the first candidate's first model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(candidates[0].recipe["models"][0]["model"])
    samples = load_samples(
        list(data),
        tokenizer,
        num_samples=settings.pop("num_samples"),
        max_length=settings.pop("max_length"),
        text_field=settings.pop("text_field"),
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Scoring(samples=samples, pad_id=pad_id, **settings)


def search(
    recipe: Mapping[str, Any],
    data: Sequence[str],
    *,
    grid: Mapping[str, list[Any]] | None = None,
    methods: Sequence[str] | None = None,
    objective: str = "tasks",
    num_samples: int = 64,
    max_length: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    text_field: str = "text",
    merge_options: Mapping[str, Any] | None = None,
    scratch: str | Path | None = None,
    prune: bool = True,
    merge_workers: int | None = None,
) -> SearchResult:
    """Score every candidate (``grid`` of the recipe, or ``methods``) on each ``data`` source;
    ``prune``: stop scoring candidates the first rows show behind (``search.race``);
    ``merge_workers``: processes merging ahead (default: one if there is a second core)."""
    from mergekit_fisher.methods import register_methods

    register_methods()
    started = time.perf_counter()
    candidates = _candidates(recipe, grid, methods)
    scoring = _scoring(
        candidates,
        data,
        num_samples=num_samples,
        max_length=max_length,
        text_field=text_field,
        batch_size=batch_size,
        device=device,
        objective=objective,
        prune=prune,
    )
    workers = default_workers() if merge_workers is None else merge_workers
    tokens = sum(d.num_tokens for d in scoring.samples.values())
    LOG.info("%d candidates on %d held-out target tokens", len(candidates), tokens)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="mergekit-fisher-search-") as tmp:
        scored = _race(candidates, scoring, Path(tmp), dict(merge_options or {}), workers)
    best = best_of(scored)
    for note in edge_warnings(best.candidate, [s.candidate for s in scored]):
        LOG.warning("search: %s", note)
    return SearchResult(
        candidates=scored,
        best=best,
        best_recipe=copy.deepcopy(best.candidate.recipe),
        seconds=time.perf_counter() - started,
        sample_tokens=tokens,
        objective=objective,
        samples=scoring.samples,
        merge_workers=workers,
    )


def _race(
    candidates: Sequence[Candidate],
    scoring: Scoring,
    scratch: Path,
    merge_options: Mapping[str, Any],
    workers: int,
) -> list[Scored]:
    """Every candidate merged (ahead, by ``workers``) and raced; each merge deleted once scored."""
    race, scored = Race(scoring), []
    recipes = [c.recipe for c in candidates]
    with merged_ahead(recipes, scratch, merge_options, workers) as merges:
        progress = tqdm(
            zip(candidates, merges), total=len(candidates), desc="search", unit="candidate"
        )
        for candidate, merged in progress:
            try:
                scored.append(race.score(candidate, merged))
            finally:
                shutil.rmtree(merged.path, ignore_errors=True)
            assert race.incumbent is not None
            progress.set_postfix_str(f"best {race.incumbent[0].label()}", refresh=False)
    return scored


def report(result: SearchResult) -> dict[str, Any]:
    """The JSON report: every candidate, its recipe, per-source losses and exact match,
    objective and time."""
    return {
        "objective": result.objective,
        "sources": {
            source: {"sequences": len(data), "target_tokens": data.num_tokens}
            for source, data in result.samples.items()
        },
        "best": result.best.label(),
        "best_recipe": result.best_recipe,
        "seconds": round(result.seconds, 3),
        "candidates": [
            {
                "method": s.candidate.method,
                "label": s.label(),
                "recipe": s.candidate.recipe,
                "losses": {x.source: x.mean for x in s.losses},
                "exact_match": {x.source: x.exact_share for x in s.losses},
                "objective": s.loss,
                "pruned": s.pruned,
                "rows": {x.source: x.rows for x in s.losses},
                "seconds": round(s.seconds, 3),
            }
            for s in result.candidates
        ],
    }
