"""What a search tries: candidates, and the coefficient grid of one recipe (``--grid``).

A candidate is a plain mergekit recipe plus the values that were searched to make it (for its
label, the report and the edge warnings). Only weight *ratios* matter to ``fisher``,
``regmean`` and normalized ``linear``, so in a grid the first model's weight stays as written
and the others are searched.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from mergekit_fisher.errors import FisherError

MAX_CANDIDATES = 256
DEFAULT_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)


class SearchError(FisherError):
    """A search that cannot run as asked."""


@dataclass(frozen=True)
class Candidate:
    """One recipe to merge and score; ``settings`` are the values searched to make it."""

    method: str
    recipe: dict[str, Any]
    settings: tuple[tuple[str, Any], ...]
    label: str

    @property
    def weights(self) -> tuple[float, ...]:
        """The recipe weight of each model, in recipe order."""
        return tuple(
            float((m.get("parameters") or {}).get("weight", 1.0)) for m in self.recipe["models"]
        )


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


def _per_model_values(models: list[Any], grid: Mapping[str, list[Any]]) -> list[list[float]]:
    """Each model's searched weights: ``weight.I`` for model I, else ``weight`` (not model 0)."""
    known = {f"weight.{i}" for i in range(len(models))}
    unknown = sorted(k for k in grid if k.startswith("weight.") and k not in known)
    if unknown:
        raise SearchError(
            f"--grid {unknown[0]}: the recipe has models weight.0 to weight.{len(models) - 1}"
        )
    per_model = []
    for i, model in enumerate(models):
        written = float((model.get("parameters") or {}).get("weight", 1.0))
        default = [written] if i == 0 else grid.get("weight", DEFAULT_WEIGHTS)
        per_model.append([float(v) for v in grid.get(f"weight.{i}", default)])
    return per_model


def candidates_for(recipe: Mapping[str, Any], grid: Mapping[str, list[Any]]) -> list[Candidate]:
    """The cartesian product of per-model weights and shared values of one recipe."""
    models = recipe.get("models") or []
    if len(models) < 2:
        raise SearchError("search needs a `models:` recipe with at least two models")
    per_model = _per_model_values(models, grid)
    shared_keys = sorted(k for k in grid if k != "weight" and not k.startswith("weight."))
    combos = itertools.product(
        itertools.product(*per_model), itertools.product(*(grid[k] for k in shared_keys))
    )
    found = [
        _grid_candidate(recipe, weights, tuple(zip(shared_keys, shared)))
        for weights, shared in combos
        if sum(weights) > 0
    ]
    if len(found) > MAX_CANDIDATES:
        raise SearchError(
            f"{len(found)} candidates exceed {MAX_CANDIDATES}: narrow the --grid values"
        )
    return found


def _grid_candidate(
    recipe: Mapping[str, Any], weights: tuple[float, ...], shared: tuple[tuple[str, Any], ...]
) -> Candidate:
    """The recipe with the weights and shared values written in (a new dict)."""
    result = copy.deepcopy(dict(recipe))
    for model, weight in zip(result["models"], weights):
        model.setdefault("parameters", {})["weight"] = weight
    result["parameters"] = {**(result.get("parameters") or {}), **dict(shared)}
    settings = tuple((f"weight.{i}", w) for i, w in enumerate(weights)) + shared
    label = " ".join([f"weights={list(weights)}"] + [f"{k}={v}" for k, v in shared])
    return Candidate(str(recipe.get("merge_method")), result, settings, label)


def edge_warnings(best: Candidate, candidates: Sequence[Candidate]) -> list[str]:
    """Searched values of the best candidate that sit on the edge of their range (same method)."""
    rivals = [c for c in candidates if c.method == best.method]
    notes = []
    for key, chosen in best.settings:
        numeric = sorted(
            {
                v
                for c in rivals
                for k, v in c.settings
                if k == key and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        if len(numeric) > 2 and chosen in (numeric[0], numeric[-1]):
            notes.append(
                f"{key}={chosen} is at the edge of the searched values {numeric}: widen --grid"
            )
    return notes
