"""The ``regmean`` merge method (Jin et al., arXiv 2212.09849) in mergekit's lazy pipeline.

For a linear weight W_m [out, in] whose input Gram matrix on model m's data is G_m [in, in]
(a ``gram`` store, mean over tokens), with recipe weight w_m and off-diagonal scale alpha::

    G~_m = alpha G_m + (1 - alpha) diag(G_m)
    W*   = (sum_m w_m W_m G~_m) (sum_m w_m G~_m)^-1

the minimiser of sum_m w_m ||X_m W^T - X_m W_m^T||^2 with regularised Grams. Solved in float64
on the kernel's device. Weights no Gram covers (embeddings, norms) get the weighted average.
"""

from __future__ import annotations

import logging
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

from mergekit_fisher.method import (
    check_binding,
    compute_dtype,
    note_averaged,
    recipe_weights,
    store_for,
    weighted_average,
)

LOG = logging.getLogger(__name__)

PARAMETERS = ("weight", "gram", "alpha")


def _solve(total_gram: torch.Tensor, rhs: torch.Tensor, name: str) -> torch.Tensor:
    """X with X @ total_gram = rhs; a ridge of 1e-10 mean(diag) only if the Gram is singular."""
    solution, info = torch.linalg.solve_ex(total_gram, rhs.T)
    if int(info) == 0 and torch.isfinite(solution).all():
        return solution.T
    ridge = 1e-10 * total_gram.diagonal().mean().clamp_min(1e-30)
    LOG.warning(
        "%s: summed Gram is singular (dead inputs?); solving with a %.1e ridge", name, ridge
    )
    eye = torch.eye(total_gram.shape[0], dtype=total_gram.dtype, device=total_gram.device)
    return torch.linalg.solve(total_gram + ridge * eye, rhs.T).T


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
        return weighted_average(entries, weights, compute_dtype(entries)).to(first.dtype)
    total = torch.zeros((first.shape[1], first.shape[1]), dtype=torch.float64, device=first.device)
    rhs = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    for e, s, tensor_name, w in zip(entries, stores, located, weights):
        assert tensor_name is not None
        g = s.get(tensor_name, device=first.device, dtype=torch.float64)
        g = alpha * g + (1 - alpha) * torch.diag_embed(g.diagonal())
        g.mul_(w)
        total.add_(g)
        rhs.add_(e.tensor.to(torch.float64) @ g)
        del g
    return _solve(total, rhs, name).to(first.dtype)


REGMEAN = merge_method(
    regmean_merge,
    name="regmean",
    pretty_name="RegMean",
    reference_url="https://arxiv.org/abs/2212.09849",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
)
