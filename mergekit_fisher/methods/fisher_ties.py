"""``fisher_ties``: TIES with Fisher importance in place of magnitude, summing what survives.

With base theta_b, experts theta_m = theta_b + tau_m, recipe weights w_m and Fisher F_m of
expert m on its own task (divided by the store's global L2 norm only when ``normalize``)::

    keep_m  = the top ``density_m`` share of the tensor's elements by importance F_m tau_m^2
    s       = sign(sum_m w_m keep_m F_m tau_m)          (the sign a Fisher merge would give)
    theta*  = theta_b + sum_m w_m keep_m [sign(tau_m) = s] tau_m

F_m tau_m^2 is, to second order, what expert m loses if tau_m is dropped at that element, so it
is the importance TIES approximates with |tau_m|. Where the kept task vectors disagree in sign,
the side with the larger Fisher-weighted pull wins and the other gives way; everywhere else each
kept task vector stays whole (summed, as ``task_arithmetic`` and ``dare_ties`` do, not averaged
as ``ties`` does). With the default ``density: 1`` nothing is trimmed: task arithmetic except
where task vectors collide. The Fisher is not normalized by default: unscaled, F_m tau_m^2 is
expert m's own loss change, comparable between experts, while each store's norm mostly says how
sure its expert is. Derivation and measurements: docs/merging.md#fisher_ties.
"""

from __future__ import annotations

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
    compute_dtype,
    expert_stores,
    note_averaged,
    task_arithmetic,
)

PARAMETERS = ("weight", "fisher", "density", "normalize")


def top_share(importance: torch.Tensor, density: float) -> torch.Tensor:
    """Mask of the ``density`` share of elements with the largest importance (ties kept)."""
    if density >= 1.0:
        return torch.ones_like(importance, dtype=torch.bool)
    k = round(density * importance.numel())
    if k <= 0:
        return torch.zeros_like(importance, dtype=torch.bool)
    threshold = importance.reshape(-1).kthvalue(importance.numel() - k + 1).values
    return importance >= threshold


def fisher_ties_merge(
    group: TensorGroup,
    fisher: PerInput[str | None] = None,
    weight: PerInput[float] = 1.0,
    density: PerInput[Annotated[float, Field(gt=0, le=1)]] = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Fisher-TIES of one tensor group (see the module docstring). Whole tensors, as mergekit's
    own ``ties`` merges them: trimming needs each tensor's importance quantile. The pulls are
    summed as they come, so the peak is the task vectors plus about four tensors in ``compute``
    (on a GPU, device memory)."""
    base = group.base.tensor
    experts, stores, located = expert_stores(group, fisher)
    if not experts:
        return base
    weights = [float(weight[e.id]) for e in experts]
    if any(n is None for n in located):  # node stores do not cover embeddings and norms
        note_averaged("task arithmetic: not covered by node stores", group.metadata.name or "")
        return task_arithmetic(base, [e.tensor for e in experts], weights)
    compute = compute_dtype(group.entries)
    theta_b = base.to(compute)
    taus = [torch.sub(e.tensor.to(compute), theta_b) for e in experts]
    pull = torch.zeros_like(theta_b)  # sum_m w_m keep_m F_m tau_m
    kept = []
    for e, s, n, tau, w in zip(experts, stores, located, taus, weights):
        scale = 1.0 / s.global_norm if normalize and s.global_norm > 0 else 1.0
        f = s.get(n, device=base.device, dtype=compute).mul_(scale).expand_as(tau)
        work = tau.square().mul_(f)  # the importance, then this expert's pull: one buffer
        keep = top_share(work, float(density[e.id]))
        pull.add_(torch.mul(f, tau, out=work).mul_(w).masked_fill_(~keep, 0.0))
        kept.append(keep)
        del f, work
    elected = torch.where(pull >= 0, 1.0, -1.0).to(compute)
    del pull
    out = theta_b.clone()
    for tau, keep, w in zip(taus, kept, weights):
        out.add_(torch.where(keep & (tau.sign() == elected), tau, 0.0), alpha=w)
    return out.to(base.dtype)


FISHER_TIES = merge_method(
    fisher_ties_merge,
    name="fisher_ties",
    pretty_name="Fisher-TIES",
    reference_url="https://arxiv.org/abs/2306.01708",
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
)
