"""The ``fisher`` merge method: Fisher-weighted averaging inside mergekit's lazy pipeline.

Per element, over inputs m with recipe weight w_m, Fisher F_m (divided by the store's global
L2 norm when ``normalize``) and floor ``epsilon``::

    theta* = sum_m w_m (F_m + epsilon) theta_m / sum_m w_m (F_m + epsilon)

Elements where that denominator is zero (every Fisher zero and ``epsilon: 0``) get the weighted
linear average, so no NaN can leak. A ``base_model`` is one more input with its own store.

The kernel receives only the *output* tensor name. Fisher tensors are found through the store's
binding (see ``store``): by name when the arriving weight is the one the store was computed on,
else by the weight's fingerprint, so ``slices:`` with shifted layers and a tied ``lm_head`` still
get the right Fisher tensor, and weights the store does not describe are refused.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Literal

import torch
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    PerInput,
    PerInputValues,
    TensorEntry,
    TensorGroup,
    merge_method,
    register,
    registered_methods,
)
from pydantic import Field

from mergekit_fisher.errors import FisherError
from mergekit_fisher.store import FisherStore, StoreError, open_store

LOG = logging.getLogger(__name__)

PARAMETERS = ("weight", "fisher", "normalize", "epsilon", "missing")
"""Every recipe parameter ``fisher`` understands (the pre-flight refuses others)."""
METHOD_OF = {"fisher": "fisher", "gram": "regmean"}
"""The merge method that reads each store statistic."""
CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk of the CPU path (256K: fastest of 64K-4M in docs/benchmarks.md)."""

_AVERAGED_LOCK = threading.Lock()
_AVERAGED: dict[str, list[str]] = {}


class RecipeError(FisherError):
    """A recipe that cannot be merged as written."""


def model_label(entry_id: object) -> str:
    """The recipe's spelling of an input model (mergekit's ``ModelReference``)."""
    model = getattr(entry_id, "model", None)
    return str(getattr(model, "path", None) or entry_id)


def take_averaged_report() -> dict[str, list[str]]:
    """Tensors merged by plain weighted averaging since the last call, by reason."""
    with _AVERAGED_LOCK:
        report = {reason: sorted(names) for reason, names in _AVERAGED.items()}
        _AVERAGED.clear()
    return report


def note_averaged(reason: str, name: str) -> None:
    with _AVERAGED_LOCK:
        _AVERAGED.setdefault(reason, []).append(name)


def open_model_store(model: str, ref: str | None, statistic: str = "fisher") -> FisherStore:
    """The store a recipe names for one model, checked to hold the statistic the method needs."""
    method = METHOD_OF[statistic]
    if not ref:
        raise RecipeError(
            f"model {model} has no `{statistic}` parameter: add `parameters: {{{statistic}: "
            f"<store directory or Hub id>}}` to it (every input of merge_method: {method} needs "
            "one, base_model included)"
        )
    try:
        store = open_store(ref)
    except StoreError as error:
        raise StoreError(f"model {model}: {error}") from None
    if store.statistic != statistic:
        raise StoreError(
            f"model {model}: {store.ref} holds {store.statistic} statistics, but merge_method "
            f"{method} needs a {statistic} store (mergekit-fisher estimate --statistic {statistic})"
        )
    return store


def store_for(entry: TensorEntry, ref: str | None, statistic: str = "fisher") -> FisherStore:
    return open_model_store(model_label(entry.id), ref, statistic)


def check_binding(store: FisherStore, name: str, entry: TensorEntry) -> str | None:
    """The store tensor for this input's weight; refuses a store bound to other weights."""
    located = store.locate(name, entry.tensor)
    if located is None and name in store and store.is_bound:
        raise StoreError(
            f"store {store.ref} was computed on other weights than {name!r} of model "
            f"{model_label(entry.id)} (another model or revision, a layer remap by slices:, "
            "or a permuted or resized vocabulary): re-estimate it on this model"
        )
    return located


def _average(
    tensors: Sequence[torch.Tensor], weights: list[float], compute: torch.dtype
) -> torch.Tensor:
    """The recipe-weighted linear average, in ``compute``."""
    total = sum(weights)
    result = torch.zeros(tensors[0].shape, dtype=compute, device=tensors[0].device)
    for tensor, w in zip(tensors, weights):
        result.add_(tensor.to(compute), alpha=w / total)
    return result


def weighted_average(
    tensors: Sequence[torch.Tensor], weights: list[float], compute: torch.dtype
) -> torch.Tensor:
    """The recipe-weighted linear average in the inputs' dtype: the fallback for weights a store
    does not cover (embeddings under node stores). Large CPU tensors go a block of rows at a
    time, so no full-size ``compute`` copy is made."""
    first = tensors[0]
    if not _by_rows(first):
        return _average(tensors, weights, compute).to(first.dtype)
    out = torch.empty_like(first)
    for start, stop in _row_blocks(first):
        out[start:stop].copy_(_average([t[start:stop] for t in tensors], weights, compute))
    return out


def _by_rows(tensor: torch.Tensor) -> bool:
    """Whether a kernel merges ``tensor`` a block of rows at a time (CPU, > CHUNK_ELEMENTS)."""
    return tensor.device.type == "cpu" and tensor.ndim > 0 and tensor.numel() > CHUNK_ELEMENTS


def _row_blocks(tensor: torch.Tensor) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about CHUNK_ELEMENTS elements each."""
    rows = tensor.shape[0]
    step = max(1, CHUNK_ELEMENTS // (tensor.numel() // rows))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def recipe_weights(group: TensorGroup, weight: PerInputValues[float]) -> list[float]:
    weights = [float(weight[e.id]) for e in group.entries]
    if sum(weights) <= 0:
        raise RecipeError(
            f"{group.metadata.name}: recipe weights sum to zero; give at least one model weight > 0"
        )
    return weights


def compute_dtype(entries: tuple[TensorEntry, ...]) -> torch.dtype:
    return torch.float64 if any(e.tensor.dtype == torch.float64 for e in entries) else torch.float32


def _check_shape(store: FisherStore, located: str, name: str, entry: TensorEntry) -> None:
    """The store tensor must broadcast to the weight (from the store's metadata, no read)."""
    stored, shape = store.stats(located).shape, tuple(entry.tensor.shape)
    try:
        fits = torch.broadcast_shapes(stored, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise StoreError(
            f"Fisher tensor {located!r} in {store.ref} has shape {list(stored)}, which does "
            f"not broadcast to {name!r} {list(shape)} of model {model_label(entry.id)}: "
            "the store describes another architecture; re-estimate it on this model"
        )


def fisher_merge(
    group: TensorGroup,
    fisher: PerInput[str | None] = None,
    weight: PerInput[Annotated[float, Field(ge=0)]] = 1.0,
    normalize: bool = True,
    epsilon: Annotated[float, Field(ge=0)] = 1e-8,
    missing: Literal["error", "uniform"] = "error",
) -> torch.Tensor:
    """Fisher-weighted average of one tensor group (see the module docstring).

    Memory: on CPU, a weight is merged a block of rows at a time (``_merge_by_rows``: the
    output is the only full-size allocation). GPU tensors and small tensors are merged whole,
    one input's Fisher at a time and every full-size step in place: about three float32
    copies of the tensor.
    """
    name = group.metadata.name or "<unnamed tensor>"
    entries = group.entries
    weights = recipe_weights(group, weight)
    first = entries[0].tensor
    compute = compute_dtype(entries)
    stores = [store_for(e, fisher[e.id]) for e in entries]
    located = [check_binding(s, name, e) for e, s in zip(entries, stores)]

    if any(n is None for n in located):
        for e, s, n in zip(entries, stores, located):
            if n is None and not (s.averages_uncovered or missing == "uniform"):
                raise StoreError(
                    f"Fisher store {s.ref} has no tensor for {name!r} (model "
                    f"{model_label(e.id)}): re-estimate it on this model, or set "
                    "`missing: uniform` to average such weights with the recipe weights"
                )
        by_nodes = all(n is not None or s.averages_uncovered for s, n in zip(stores, located))
        note_averaged("not covered by node stores" if by_nodes else "missing", name)
        return weighted_average([e.tensor for e in entries], weights, compute)

    names = [n for n in located if n is not None]
    for e, s, n in zip(entries, stores, names):
        _check_shape(s, n, name, e)
    scales = [
        w / (s.global_norm if normalize and s.global_norm > 0 else 1.0)
        for s, w in zip(stores, weights)
    ]
    offsets = [w * epsilon for w in weights]
    floored = epsilon * max(weights) >= torch.finfo(compute).tiny
    if _by_rows(first):
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(s.reader(n)) for s, n in zip(stores, names)]
            return _merge_by_rows(entries, readers, scales, offsets, weights, compute, floored)

    numerator: torch.Tensor | None = None
    denominator: torch.Tensor | None = None
    for e, s, n, scale, offset in zip(entries, stores, names, scales, offsets):
        coefficient = s.get(n, device=first.device, dtype=compute).mul_(scale).add_(offset)
        theta = e.tensor.to(compute)
        if numerator is None:
            numerator = coefficient * theta
        else:
            numerator.addcmul_(coefficient, theta)
        del theta
        if denominator is None:
            denominator = coefficient
        elif torch.broadcast_shapes(denominator.shape, coefficient.shape) == denominator.shape:
            denominator.add_(coefficient)
        else:
            denominator = denominator + coefficient
        del coefficient
    assert numerator is not None and denominator is not None
    tensors = [e.tensor for e in entries]
    return _divide(numerator, denominator, floored, tensors, weights).to(first.dtype)


def _divide(
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    floored: bool,
    tensors: Sequence[torch.Tensor],
    weights: list[float],
) -> torch.Tensor:
    """numerator / denominator, in place where it can; elements whose denominator is zero
    (every Fisher zero and no epsilon floor) take the linear average of ``tensors``."""
    if floored:
        return numerator.div_(denominator)  # the floor keeps the denominator positive
    zero = denominator <= 0
    if not bool(zero.any()):
        return numerator.div_(denominator)
    numerator.div_(denominator.masked_fill(zero, 1.0))
    return torch.where(zero, _average(tensors, weights, numerator.dtype), numerator)


def _merge_by_rows(
    entries: tuple[TensorEntry, ...],
    readers: list[Callable[[int | None, int | None], torch.Tensor]],
    scales: list[float],
    offsets: list[float],
    weights: list[float],
    compute: torch.dtype,
    floored: bool,
) -> torch.Tensor:
    """The whole-tensor formula, a block of rows at a time: four block-sized float32 buffers
    and the output are all it allocates, and each Fisher is read one block at a time."""
    first = entries[0].tensor
    blocks = list(_row_blocks(first))
    out = torch.empty_like(first)
    numerator, denominator, coefficient, theta = torch.empty(
        (4, blocks[0][1], *first.shape[1:]), dtype=compute
    )
    for start, stop in blocks:
        k = stop - start
        num, den, coef, th = numerator[:k], denominator[:k], coefficient[:k], theta[:k]
        for i, (e, read, scale, offset) in enumerate(zip(entries, readers, scales, offsets)):
            coef.copy_(read(start, stop)).mul_(scale).add_(offset)  # broadcasts node stores
            th.copy_(e.tensor[start:stop])
            if i == 0:
                torch.mul(coef, th, out=num)
                den.copy_(coef)
            else:
                num.addcmul_(coef, th)
                den.add_(coef)
        block = [e.tensor[start:stop] for e in entries]
        out[start:stop].copy_(_divide(num, den, floored, block, weights))
    return out


FISHER = merge_method(
    fisher_merge,
    name="fisher",
    pretty_name="Fisher merging",
    reference_url="https://arxiv.org/abs/2111.09832",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
)


def register_methods() -> None:
    """Register ``fisher`` and ``regmean`` with mergekit, once (``register`` refuses duplicates).

    ``regmean`` builds on this module, so when it is the one being imported it is not ready
    yet: it then registers itself as its last step.
    """
    methods = [FISHER]
    regmean = sys.modules.get("mergekit_fisher.regmean")
    if regmean is None or hasattr(regmean, "REGMEAN"):
        from mergekit_fisher.regmean import REGMEAN

        methods.append(REGMEAN)
    known = {m.spec.name for m in registered_methods()}
    for method in methods:
        if method.spec.name not in known:
            register(method)


register_methods()
