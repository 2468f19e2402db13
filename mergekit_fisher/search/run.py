"""Run a search: merge every candidate through mergekit, score it per source, keep the best.

Every candidate goes through ``run_merge`` (the ``mergekit-yaml`` code path) into a scratch
directory. Candidates share what can be shared: mergekit's loader cache (opened input models),
our store cache and the tokenized samples; the cost is one merge plus one forward pass over the
samples per candidate. Merges run with ``random_seed`` 0 unless told otherwise, so DARE's random
drops are the same on every run.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergekit_fisher.data import CalibrationData
from mergekit_fisher.search.candidates import (
    Candidate,
    SearchError,
    candidates_for,
    edge_warnings,
)
from mergekit_fisher.search.methods import method_candidates
from mergekit_fisher.search.score import SourceLoss, load_samples, objective, source_losses

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """A candidate with its per-source losses, objective and merge+score time."""

    candidate: Candidate
    losses: tuple[SourceLoss, ...]
    loss: float  # the objective
    seconds: float
    tiebreak: float = 0.0  # the ``tasks`` loss, which orders candidates the objective ties

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


@dataclass(frozen=True)
class Scoring:
    """How candidates are scored: the samples and the settings every candidate shares."""

    samples: dict[str, CalibrationData]
    pad_id: int
    batch_size: int
    device: str
    objective: str
    merge_options: Mapping[str, Any]


def _merge(recipe: Mapping[str, Any], out: Path, options: Mapping[str, Any]) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(copy.deepcopy(dict(recipe))),
        str(out),
        options=MergeOptions(
            **{"copy_tokenizer": False, "quiet": True, "write_model_card": False}
            | {"random_seed": 0}
            | dict(options)
        ),
    )


def score_candidate(candidate: Candidate, scratch: Path, scoring: Scoring) -> Scored:
    """Merge one candidate into ``scratch``, score it on every source, delete the merge."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    out = Path(tempfile.mkdtemp(dir=scratch))
    try:
        _merge(candidate.recipe, out, scoring.merge_options)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        model = model.to(scoring.device).eval()
        losses = source_losses(model, scoring.samples, scoring.pad_id, scoring.batch_size)
        del model
    finally:
        shutil.rmtree(out, ignore_errors=True)
    loss = objective(losses, scoring.objective)
    tiebreak = objective(losses, "tasks")
    return Scored(candidate, losses, loss, time.perf_counter() - started, tiebreak)


def rank_key(scored: Scored) -> tuple[bool, float, bool, float]:
    """Lowest objective first, ties (common under ``exact``) by the ``tasks`` loss; NaN last."""
    return (math.isnan(scored.loss), scored.loss, math.isnan(scored.tiebreak), scored.tiebreak)


def best_of(scored: Sequence[Scored]) -> Scored:
    """The lowest objective, ties broken by the ``tasks`` loss (a NaN objective never wins)."""
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
) -> SearchResult:
    """Score every candidate (``grid`` of the recipe, or ``methods``) on each ``data`` source."""
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
        merge_options=dict(merge_options or {}),
    )
    tokens = sum(d.num_tokens for d in scoring.samples.values())
    LOG.info("%d candidates on %d held-out target tokens", len(candidates), tokens)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="mergekit-fisher-search-") as tmp:
        scored = [
            score_candidate(c, Path(tmp), scoring)
            for c in tqdm(candidates, desc="search", unit="candidate")
        ]
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
    )


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
                "seconds": round(s.seconds, 3),
            }
            for s in result.candidates
        ],
    }
