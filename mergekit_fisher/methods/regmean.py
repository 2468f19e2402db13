"""The ``regmean`` merge method (Jin et al., arXiv 2212.09849) in mergekit's lazy pipeline.

For a linear weight W_m [out, in] whose input Gram matrix on model m's data is G_m [in, in]
(a ``gram`` store, mean over tokens), with recipe weight w_m and off-diagonal scale alpha::

    G~_m = alpha G_m + (1 - alpha) diag(G_m)
    W*   = (sum_m w_m W_m G~_m) (sum_m w_m G~_m)^-1

the minimiser of sum_m w_m ||X_m W^T - X_m W_m^T||^2 with regularised Grams, solved in float64
on the kernel's device by ``tensor_merge`` (shared with ``regmean-plus``). Weights that read
the same input (q/k/v, gate/up) share one Gram: its solver (T's factor and the scaled Grams) is
built once per input and cached until every weight the store lists for it was merged. Weights
no Gram covers (embeddings, norms) get the weighted average.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated

import torch
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    PerInput,
    TensorGroup,
    merge_method,
)
from pydantic import Field

from mergekit_fisher.methods.common import (
    check_binding,
    compute_dtype,
    note_averaged,
    recipe_weights,
    store_for,
    weighted_average,
)
from mergekit_fisher.store import FisherStore
from mergekit_fisher.tensor_merge import RegMeanSolver, factor_grams

LOG = logging.getLogger(__name__)

PARAMETERS = ("weight", "gram", "alpha")
"""Every recipe parameter ``regmean`` understands (the pre-flight refuses others)."""
MAX_CACHED_INPUTS = 8
"""Factorizations kept at most (bounds memory when a recipe merges only some consumers)."""

CacheKey = tuple[object, ...]


@dataclass
class _Factored:
    """One input's solver, built by the first of its consumers to arrive."""

    remaining: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    solver: RegMeanSolver | None = None


_CACHE_LOCK = threading.Lock()
_CACHE: OrderedDict[CacheKey, _Factored] = OrderedDict()


def cached_inputs() -> int:
    """How many factorized inputs the cache holds (0 once every consumer was merged)."""
    with _CACHE_LOCK:
        return len(_CACHE)


def clear_factor_cache() -> None:
    """Drop every cached factorization."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _prepare(
    entry: _Factored,
    stores: list[FisherStore],
    located: list[str],
    weights: list[float],
    alpha: float,
    device: torch.device,
    name: str,
) -> None:
    """Fill ``entry`` with the solver of one input, its Grams read one store at a time."""
    grams = (s.get(n, device=device, dtype=torch.float64) for s, n in zip(stores, located))
    entry.solver = factor_grams(grams, weights, alpha, name)


def _acquire(key: CacheKey, consumers: int) -> _Factored:
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            entry = _CACHE[key] = _Factored(remaining=consumers)
            while len(_CACHE) > MAX_CACHED_INPUTS:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
        return entry


def _release(key: CacheKey, entry: _Factored) -> None:
    with _CACHE_LOCK:
        entry.remaining -= 1
        if entry.remaining <= 0 and _CACHE.get(key) is entry:
            del _CACHE[key]


def regmean_merge(
    group: TensorGroup,
    gram: PerInput[str | None] = None,
    weight: PerInput[Annotated[float, Field(ge=0)]] = 1.0,
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.9,
) -> torch.Tensor:
    """RegMean of one tensor group (see the module docstring)."""
    name = group.metadata.name or "<unnamed tensor>"
    entries = group.entries
    weights = recipe_weights(group, weight)
    first = entries[0].tensor
    stores = [store_for(e, gram[e.id], statistic="gram") for e in entries]
    located = [check_binding(s, name, e) for e, s in zip(entries, stores)]
    if first.ndim != 2 or any(n is None for n in located):
        note_averaged("not covered by Gram stores", name)
        return weighted_average([e.tensor for e in entries], weights, compute_dtype(entries))
    names = [n for n in located if n is not None]
    device = first.device
    key: CacheKey = (
        tuple(str(s.path) for s in stores),
        tuple(names),
        float(alpha),
        tuple(weights),
        str(device),
    )
    entry = _acquire(key, max(stores[0].consumer_count(names[0]), 1))
    try:
        with entry.lock:
            if entry.solver is None:
                _prepare(entry, stores, names, weights, alpha, device, name)
        assert entry.solver is not None
        return entry.solver.merge([e.tensor for e in entries])
    finally:
        _release(key, entry)


REGMEAN = merge_method(
    regmean_merge,
    name="regmean",
    pretty_name="RegMean",
    reference_url="https://arxiv.org/abs/2212.09849",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
)
