"""``fisher_arithmetic``: task arithmetic whose task vectors give way only where another expert's
Fisher says it cares much more.

With base theta_b, experts theta_m = theta_b + tau_m, recipe weights w_m and Fisher F_m of expert m
on its own task (divided by the store's global L2 norm when ``normalize``), per element::

    c_m     = min(1, (1 + gamma (M - 1)) F_m / ((1 - gamma) F_m + gamma sum_k F_k))
    theta*  = theta_b + sum_m w_m c_m tau_m

Under the diagonal quadratic model, keeping tau_m[j] is worth F_m[j] tau_m[j]^2 / 2 to expert m and
costs every other expert k about F_k[j] tau_m[j]^2 / 2: the Fisher ratio, not the task vector, decides
who gives way. ``gamma`` is how much that cost is believed: 0 is exactly ``task_arithmetic``
(every c_m = 1), 1 is M times the Fisher-weighted average of the task vectors (c_m = M F_m / sum F),
and in between an expert keeps its whole task vector unless the others' summed Fisher outweighs
its own by about 1/gamma. Where experts care equally, c_m = 1: unlike every average, nobody's
task vector is halved. Elements where every Fisher is zero keep c_m = 1 (task arithmetic).
Derivation and measurements: docs/merging.md#fisher-arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
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
    by_rows,
    compute_dtype,
    expert_stores,
    note_averaged,
    row_blocks,
    task_arithmetic,
)

PARAMETERS = ("weight", "fisher", "gamma", "normalize")

Reader = Callable[[int | None, int | None], torch.Tensor]


def coefficients(fishers: Sequence[torch.Tensor], gamma: float) -> list[torch.Tensor]:
    """c_m for each expert (see the module docstring), broadcast to the Fisher tensors' shape."""
    shape = torch.broadcast_shapes(*(f.shape for f in fishers))
    total = torch.zeros(shape, dtype=fishers[0].dtype, device=fishers[0].device)
    for f in fishers:
        total.add_(f)
    gain = 1.0 + gamma * (len(fishers) - 1)
    result = []
    for f in fishers:
        denominator = (f * (1.0 - gamma)).add_(total, alpha=gamma)
        c = (f * gain).div_(denominator.clamp_min_(torch.finfo(f.dtype).tiny)).clamp_(max=1.0)
        result.append(c.masked_fill_(denominator <= torch.finfo(f.dtype).tiny, 1.0))
    return result


def _merge_block(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    gamma: float,
    compute: torch.dtype,
) -> torch.Tensor:
    """theta_b + sum_m w_m c_m tau_m for one block, in ``compute``."""
    theta_b = base.to(compute)
    out = theta_b.clone()
    for expert, c, w in zip(experts, coefficients(fishers, gamma), weights):
        out.addcmul_(torch.sub(expert.to(compute), theta_b), c, value=w)  # inputs stay intact
    return out


def fisher_arithmetic_merge(
    group: TensorGroup,
    fisher: PerInput[str | None] = None,
    weight: PerInput[float] = 1.0,
    gamma: Annotated[float, Field(ge=0, le=1)] = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Fisher-arbitrated task arithmetic of one tensor group (see the module docstring)."""
    base = group.base.tensor
    experts, stores, located = expert_stores(group, fisher)
    if not experts:
        return base
    weights = [float(weight[e.id]) for e in experts]
    compute = compute_dtype(group.entries)
    if any(n is None for n in located):  # node stores do not cover embeddings and norms
        note_averaged("task arithmetic: not covered by node stores", group.metadata.name or "")
        return task_arithmetic(base, [e.tensor for e in experts], weights)
    scales = [1.0 / s.global_norm if normalize and s.global_norm > 0 else 1.0 for s in stores]
    with contextlib.ExitStack() as stack:
        readers = [
            stack.enter_context(s.reader(n, device=base.device, dtype=compute))
            for s, n in zip(stores, located)
            if n
        ]
        blocks = list(row_blocks(base)) if by_rows(base) else [(None, None)]
        out = torch.empty_like(base) if len(blocks) > 1 else None
        for start, stop in blocks:
            rows = slice(start, stop)
            fishers = [read(start, stop).mul_(scale) for read, scale in zip(readers, scales)]
            merged = _merge_block(
                base[rows], [e.tensor[rows] for e in experts], fishers, weights, gamma, compute
            )
            if out is None:
                return merged.to(base.dtype)
            out[rows].copy_(merged)
    return out


FISHER_ARITHMETIC = merge_method(
    fisher_arithmetic_merge,
    name="fisher_arithmetic",
    pretty_name="Fisher-arbitrated task arithmetic",
    reference_url="https://github.com/mergekit-fisher/mergekit-fisher/blob/main/docs/merging.md",
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
)
