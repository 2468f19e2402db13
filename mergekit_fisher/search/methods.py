"""``search --methods``: one recipe per method and grid point, from one recipe of all inputs.

The input recipe names ``base_model`` and each expert once with every store it has
(``fisher:``, ``gram:``), whatever its ``merge_method``. Each method gets only what it takes:
its own store parameter, ``base_model`` if it builds on task vectors, and only the experts if
it averages (an average with the base would just dilute them). Which family wins (averages or
task vectors) depends on how far the experts drifted from their base, so it is decided on
validation data, not guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergekit_fisher.search.candidates import Candidate, SearchError

LOG = logging.getLogger(__name__)

Point = tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]
"""One grid point: (per-model parameters, shared parameters)."""


def _points(key: str, values: Sequence[Any], per_model: bool, **fixed: Any) -> tuple[Point, ...]:
    """One point per value of ``key`` (per model or shared), every expert at ``fixed``."""
    common = tuple(fixed.items())
    if per_model:
        return tuple(((*common, (key, v)), ()) for v in values)
    return tuple((common, ((key, v),)) for v in values)


@dataclass(frozen=True)
class MethodGrid:
    """A method's small default grid and what its recipes need."""

    store: str | None  # the per-model store parameter it needs (fisher, gram), if any
    needs_base: bool  # task-vector methods: base_model is the origin of the task vectors
    points: tuple[Point, ...] = field(default=(((("weight", 1.0),), ()),))


TRIMMED = _points("density", (0.5, 0.7), per_model=True, weight=1.0)
METHOD_GRIDS: dict[str, MethodGrid] = {
    "linear": MethodGrid(store=None, needs_base=False),
    "karcher": MethodGrid(store=None, needs_base=False, points=(((), ()),)),
    # past both ends of the old 0.5-1: its optimum lay below 0.5 (4 real experts) and above 1 (2)
    "task_arithmetic": MethodGrid(
        None, True, _points("weight", (0.25, 0.5, 0.75, 1.0, 1.25, 1.5), per_model=True)
    ),
    "ties": MethodGrid(store=None, needs_base=True, points=TRIMMED),
    "dare_ties": MethodGrid(store=None, needs_base=True, points=TRIMMED),
    "della": MethodGrid(store=None, needs_base=True, points=TRIMMED),
    "fisher": MethodGrid(store="fisher", needs_base=False),
    "fisher_arithmetic": MethodGrid(
        "fisher", True, _points("gamma", (0.0, 0.1, 0.3, 1.0), per_model=False, weight=1.0)
    ),
    # normalize: true as well: the unscaled default lets a nearly certain expert lose every collision
    "fisher_ties": MethodGrid(
        "fisher",
        True,
        _points("density", (1.0, 0.7), per_model=True, weight=1.0)
        + _points("normalize", (True,), per_model=False, weight=1.0, density=1.0),
    ),
    "regmean": MethodGrid(store="gram", needs_base=False),
}
STORE_KEYS = frozenset(g.store for g in METHOD_GRIDS.values() if g.store)
RECIPE_KEYS = frozenset({"merge_method", "models", "base_model", "parameters"})


@dataclass(frozen=True)
class Inputs:
    """The merge inputs of a ``--methods`` recipe: the base, the experts and their stores."""

    base: str | None
    experts: tuple[str, ...]
    stores: tuple[Mapping[str, str], ...]  # per expert: store parameter -> reference
    extras: Mapping[str, Any]  # dtype, out_dtype, tokenizer_source, ...: copied to every recipe


def parse_methods(text: str) -> list[str]:
    """``all`` or a comma list of methods with a default grid."""
    names = list(METHOD_GRIDS) if text.strip() == "all" else [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in METHOD_GRIDS]
    if unknown or not names:
        raise SearchError(
            f"--methods {text!r}: no default grid for {unknown or names}; choose `all` or from "
            f"{', '.join(METHOD_GRIDS)} (search any other method alone with --grid)"
        )
    return list(dict.fromkeys(names))


def read_inputs(recipe: Mapping[str, Any]) -> Inputs:
    """The base and each expert (every model under ``models:`` that is not the base)."""
    if recipe.get("slices") or not recipe.get("models"):
        raise SearchError(
            "search --methods needs a `models:` recipe (no `slices:`) listing each expert once"
        )
    base = recipe.get("base_model")
    experts = [m for m in recipe["models"] if m["model"] != base]
    if not experts:
        raise SearchError("search --methods needs at least one model besides base_model")
    return Inputs(
        base=base,
        experts=tuple(str(m["model"]) for m in experts),
        stores=tuple(
            {k: str(v) for k, v in (m.get("parameters") or {}).items() if k in STORE_KEYS}
            for m in experts
        ),
        extras={k: v for k, v in recipe.items() if k not in RECIPE_KEYS},
    )


def _unavailable(method: str, grid: MethodGrid, inputs: Inputs) -> str | None:
    """Why ``method`` cannot be built from these inputs, or None."""
    if grid.needs_base and not inputs.base:
        return "it needs base_model"
    for expert, stores in zip(inputs.experts, inputs.stores):
        if grid.store and grid.store not in stores:
            return f"model {expert} has no `{grid.store}:` store"
    return None


def method_recipe(method: str, inputs: Inputs, point: Point) -> dict[str, Any]:
    """A plain recipe of ``method`` at one grid point."""
    grid = METHOD_GRIDS[method]
    per_model, shared = point
    models = []
    for expert, stores in zip(inputs.experts, inputs.stores):
        params = dict(per_model)
        if grid.store:
            params[grid.store] = stores[grid.store]
        models.append({"model": expert, **({"parameters": params} if params else {})})
    recipe: dict[str, Any] = {"merge_method": method}
    if grid.needs_base:
        recipe["base_model"] = inputs.base
    recipe["models"] = models
    if shared:
        recipe["parameters"] = dict(shared)
    return recipe | dict(inputs.extras)


def method_candidates(recipe: Mapping[str, Any], methods: Sequence[str]) -> list[Candidate]:
    """Every buildable method's grid; methods whose inputs are missing are skipped, logged."""
    inputs = read_inputs(recipe)
    found = []
    for method in methods:
        grid = METHOD_GRIDS[method]
        why = _unavailable(method, grid, inputs)
        if why:
            LOG.warning("search: skipping %s: %s", method, why)
            continue
        for point in grid.points:
            settings = point[0] + point[1]
            label = " ".join([method] + [f"{k}={v}" for k, v in settings])
            found.append(Candidate(method, method_recipe(method, inputs, point), settings, label))
    if not found:
        raise SearchError(
            f"no method of {list(methods)} can be built from this recipe: add base_model and "
            "each model's stores (fisher:, gram:)"
        )
    return found
