"""What every merge method of the plugin shares: finding, binding and shape-checking each input's
store, recipe weights, the compute dtype, the weighted-average fallback and CPU row blocks.

Method files import from here only (never from each other), so adding a method is one file
plus one line in ``methods/__init__.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import torch
from mergekit.merge_methods import PerInput, PerInputValues, TensorEntry, TensorGroup

from mergekit_fisher.errors import FisherError
from mergekit_fisher.store import FisherStore, StoreError, open_store
from mergekit_fisher.tensor_merge import average

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
    """Record that ``name`` was merged by plain weighted averaging (see take_averaged_report)."""
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
    """The store of one kernel input (see open_model_store)."""
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


def weighted_average(
    tensors: Sequence[torch.Tensor], weights: list[float], compute: torch.dtype
) -> torch.Tensor:
    """The recipe-weighted linear average in the inputs' dtype: the fallback for weights a store
    does not cover (embeddings under node stores). Large CPU tensors go a block of rows at a
    time, so no full-size ``compute`` copy is made."""
    first = tensors[0]
    if not by_rows(first):
        return average(tensors, weights, compute).to(first.dtype)
    out = torch.empty_like(first)
    for start, stop in row_blocks(first):
        out[start:stop].copy_(average([t[start:stop] for t in tensors], weights, compute))
    return out


def by_rows(tensor: torch.Tensor) -> bool:
    """Whether a kernel merges ``tensor`` a block of rows at a time (CPU, > CHUNK_ELEMENTS)."""
    return tensor.device.type == "cpu" and tensor.ndim > 0 and tensor.numel() > CHUNK_ELEMENTS


def row_blocks(tensor: torch.Tensor) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about CHUNK_ELEMENTS elements each."""
    rows = tensor.shape[0]
    step = max(1, CHUNK_ELEMENTS // (tensor.numel() // rows))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def recipe_weights(group: TensorGroup, weight: PerInputValues[float]) -> list[float]:
    """Each input's recipe weight, in entry order; refuses weights that sum to zero."""
    weights = [float(weight[e.id]) for e in group.entries]
    if sum(weights) <= 0:
        raise RecipeError(
            f"{group.metadata.name}: recipe weights sum to zero; give at least one model weight > 0"
        )
    return weights


def compute_dtype(entries: tuple[TensorEntry, ...]) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(e.tensor.dtype == torch.float64 for e in entries) else torch.float32


def check_shape(store: FisherStore, located: str, name: str, entry: TensorEntry) -> None:
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


def expert_stores(
    group: TensorGroup, fisher: PerInput[str | None]
) -> tuple[list[TensorEntry], list[FisherStore], list[str | None]]:
    """The experts (non-base inputs) of a task-vector method, their stores and the located
    tensor of each (None where a node store leaves the weight uncovered)."""
    name = group.metadata.name or "<unnamed tensor>"
    experts = list(group.non_base)
    stores = [store_for(e, fisher[e.id]) for e in experts]
    located = [check_binding(s, name, e) for e, s in zip(experts, stores)]
    for e, s, n in zip(experts, stores, located):
        if n is None and not s.averages_uncovered:
            raise StoreError(
                f"Fisher store {s.ref} has no tensor for {name!r} (model {model_label(e.id)}): "
                "re-estimate it on this model"
            )
        if n is not None:
            check_shape(s, n, name, e)
    return experts, stores, located


def task_arithmetic(
    base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """theta_b + sum_m w_m (theta_m - theta_b) in ``base``'s dtype: what the task-vector methods
    do where no store covers a weight. Inputs are never modified."""
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    theta_b = base.to(compute)
    out = theta_b.clone()
    for expert, w in zip(experts, weights):
        out.add_(torch.sub(expert.to(compute), theta_b), alpha=w)
    return out.to(base.dtype)
