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
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

import torch
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    PerInput,
    TensorEntry,
    TensorGroup,
    merge_method,
)
from pydantic import Field

from mergekit_fisher.methods.common import (
    average,
    by_rows,
    check_binding,
    check_shape,
    compute_dtype,
    model_label,
    note_averaged,
    recipe_weights,
    row_blocks,
    store_for,
    weighted_average,
)
from mergekit_fisher.store import StoreError

PARAMETERS = ("weight", "fisher", "normalize", "epsilon", "missing")
"""Every recipe parameter ``fisher`` understands (the pre-flight refuses others)."""


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
        check_shape(s, n, name, e)
    scales = [
        w / (s.global_norm if normalize and s.global_norm > 0 else 1.0)
        for s, w in zip(stores, weights)
    ]
    offsets = [w * epsilon for w in weights]
    floored = epsilon * max(weights) >= torch.finfo(compute).tiny
    if by_rows(first):
        with contextlib.ExitStack() as stack:
            readers = [
                stack.enter_context(s.reader(n, device=first.device)) for s, n in zip(stores, names)
            ]
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
    return torch.where(zero, average(tensors, weights, numerator.dtype), numerator)


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
    blocks = list(row_blocks(first))
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
