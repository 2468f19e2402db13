"""Coefficient search: pick a recipe's merge coefficients by held-out loss.

Matena & Raffel tune per-model scaling coefficients on validation data. ``search`` takes a
``models:`` recipe, a grid over per-model ``weight`` and shared parameters (``epsilon``,
``alpha``, ...), merges every candidate through mergekit's own pipeline (``run_merge``, the
code path of ``mergekit-yaml``) into a scratch directory, and scores it by the mean next-token
loss on a small sample of the user's data. Only weight *ratios* matter to ``fisher``,
``regmean`` and normalized ``linear``, so the first model's weight stays as written and the
others are searched. Candidates share the opened models and stores (mergekit's loader cache,
our store cache) and the tokenized sample; the cost is one merge plus one forward pass over
the sample per candidate.
"""

from __future__ import annotations

import copy
import itertools
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
import yaml
from tqdm.auto import tqdm

from mergekit_fisher.data import CalibrationData, load_calibration_data, pad_batch
from mergekit_fisher.errors import FisherError

LOG = logging.getLogger(__name__)

MAX_CANDIDATES = 256
DEFAULT_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)


class SearchError(FisherError):
    """A search that cannot run as asked."""


@dataclass(frozen=True)
class Candidate:
    weights: tuple[float, ...]
    shared: tuple[tuple[str, Any], ...]
    loss: float = math.nan
    seconds: float = 0.0

    def label(self) -> str:
        parts = [f"weights={list(self.weights)}"] + [f"{k}={v}" for k, v in self.shared]
        return " ".join(parts)


@dataclass
class SearchResult:
    candidates: list[Candidate]
    best: Candidate
    best_recipe: dict[str, Any]
    seconds: float
    sample_tokens: int


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["weight=0.5,1,2", "epsilon=1e-8,1e-6"]`` -> {"weight": [...], "epsilon": [...]}."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise SearchError(f"--grid {spec!r}: write KEY=V1,V2,... (e.g. weight=0.5,1,2)")
        grid[key.strip()] = [_scalar(v.strip()) for v in values.split(",")]
    return grid


def _scalar(text: str) -> Any:
    """A number where it is one (YAML 1.1 would keep ``1e-8`` a string), else YAML's reading."""
    try:
        return float(text) if any(c in text for c in ".eE") or text in ("inf", "nan") else int(text)
    except ValueError:
        return yaml.safe_load(text)


def candidates_for(recipe: Mapping[str, Any], grid: Mapping[str, list[Any]]) -> list[Candidate]:
    """The cartesian product of per-model weights and shared values.

    ``weight.I`` lists model I's values (0-based, recipe order); ``weight`` lists the values of
    every model but the first, whose weight otherwise stays as written (only ratios matter).
    """
    models = recipe.get("models") or []
    if len(models) < 2:
        raise SearchError("search needs a `models:` recipe with at least two models")
    per_model = []
    for i, model in enumerate(models):
        written = float((model.get("parameters") or {}).get("weight", 1.0))
        default = [written] if i == 0 else grid.get("weight", DEFAULT_WEIGHTS)
        per_model.append([float(v) for v in grid.get(f"weight.{i}", default)])
    unknown = sorted(
        k
        for k in grid
        if k.startswith("weight.")
        and k.removeprefix("weight.") not in {str(i) for i in range(len(models))}
    )
    if unknown:
        raise SearchError(
            f"--grid {unknown[0]}: the recipe has models weight.0 to weight.{len(models) - 1}"
        )
    shared_keys = sorted(k for k in grid if k != "weight" and not k.startswith("weight."))
    combos = itertools.product(
        itertools.product(*per_model), itertools.product(*(grid[k] for k in shared_keys))
    )
    found = [
        Candidate(weights=weights, shared=tuple(zip(shared_keys, shared)))
        for weights, shared in combos
        if sum(weights) > 0
    ]
    if len(found) > MAX_CANDIDATES:
        raise SearchError(
            f"{len(found)} candidates exceed {MAX_CANDIDATES}: narrow the --grid values"
        )
    return found


def edge_warnings(result_best: Candidate, candidates: Sequence[Candidate]) -> list[str]:
    """Coefficients of the best candidate that sit on the edge of a searched range."""
    notes = []
    columns = {
        f"weight.{i}": [c.weights[i] for c in candidates] for i in range(len(result_best.weights))
    }
    columns.update({k: [dict(c.shared)[k] for c in candidates] for k, _ in result_best.shared})
    chosen = {f"weight.{i}": w for i, w in enumerate(result_best.weights)} | dict(
        result_best.shared
    )
    for key, values in columns.items():
        numeric = sorted(
            {v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        if len(numeric) > 2 and chosen[key] in (numeric[0], numeric[-1]):
            notes.append(
                f"{key}={chosen[key]} is at the edge of the searched values {numeric}: widen --grid"
            )
    return notes


def apply(recipe: Mapping[str, Any], candidate: Candidate) -> dict[str, Any]:
    """The recipe with the candidate's coefficients written in (a new dict)."""
    result = copy.deepcopy(dict(recipe))
    for model, weight in zip(result["models"], candidate.weights):
        model.setdefault("parameters", {})["weight"] = weight
    params = result.setdefault("parameters", {}) or {}
    params.update(dict(candidate.shared))
    result["parameters"] = params
    return result


def mean_target_nll(
    model: torch.nn.Module, data: CalibrationData, pad_id: int, batch_size: int = 8
) -> float:
    """Mean negative log-likelihood of the target tokens (the held-out loss)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.examples), batch_size):
            batch = pad_batch(data.examples[start : start + batch_size], pad_id)
            logits = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
            ).logits.float()
            targets = batch.target_mask[:, 1:].to(device)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, batch.input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            total -= float(picked[targets].double().sum())
            count += int(targets.sum())
    return total / max(count, 1)


def _merge_and_score(
    recipe: Mapping[str, Any],
    scratch: Path,
    data: CalibrationData,
    pad_id: int,
    batch_size: int,
    device: str,
    options: Mapping[str, Any],
) -> float:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    out = Path(tempfile.mkdtemp(dir=scratch))
    run_merge(
        MergeConfiguration.model_validate(copy.deepcopy(dict(recipe))),
        str(out),
        options=MergeOptions(
            copy_tokenizer=False, quiet=True, write_model_card=False, **dict(options)
        ),
    )
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    try:
        return mean_target_nll(model, data, pad_id, batch_size)
    finally:
        del model
        shutil.rmtree(out, ignore_errors=True)


def search(
    recipe: Mapping[str, Any],
    data: Sequence[str],
    *,
    grid: Mapping[str, list[Any]] | None = None,
    num_samples: int = 64,
    max_length: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    text_field: str = "text",
    merge_options: Mapping[str, Any] | None = None,
    scratch: str | Path | None = None,
) -> SearchResult:
    """Score every candidate of ``grid`` on ``data``; return them all and the best recipe."""
    from transformers import AutoTokenizer

    from mergekit_fisher.methods import register_methods

    register_methods()
    started = time.perf_counter()
    candidates = candidates_for(recipe, grid or {})
    tokenizer_source = recipe["models"][0]["model"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    sample = load_calibration_data(
        list(data), tokenizer, max_length=max_length, num_samples=num_samples, text_field=text_field
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    LOG.info("%d candidates on %d held-out target tokens", len(candidates), sample.num_tokens)
    scored = []
    with tempfile.TemporaryDirectory(dir=scratch, prefix="mergekit-fisher-search-") as tmp:
        for candidate in tqdm(candidates, desc="search", unit="candidate"):
            t0 = time.perf_counter()
            loss = _merge_and_score(
                apply(recipe, candidate),
                Path(tmp),
                sample,
                pad_id,
                batch_size,
                device,
                merge_options or {},
            )
            scored.append(
                Candidate(candidate.weights, candidate.shared, loss, time.perf_counter() - t0)
            )
    best = min(scored, key=lambda c: (math.isnan(c.loss), c.loss))
    for note in edge_warnings(best, scored):
        LOG.warning("search: %s", note)
    return SearchResult(
        candidates=scored,
        best=best,
        best_recipe=apply(recipe, best),
        seconds=time.perf_counter() - started,
        sample_tokens=sample.num_tokens,
    )
