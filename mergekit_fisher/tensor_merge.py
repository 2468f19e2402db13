"""Per-tensor merge arithmetic that needs no mergekit: the recipe-weighted average and RegMean's
closed form. The merge methods use it inside mergekit's pipeline (one tensor at a time) and
``regmean-plus`` between decoder layers (one block at a time): one implementation of each.

RegMean, for weights W_m [out, in], input Grams G_m [in, in], recipe weights w_m and
off-diagonal scale alpha::

    G~_m = alpha G_m + (1 - alpha) diag(G_m)
    W*   = (sum_m w_m W_m G~_m) (sum_m w_m G~_m)^-1

solved in float64 as ``W* = W_M + (sum_{m<M} w_m (W_m - W_M) G~_m) T^-1`` with
``T = sum_m w_m G~_m`` (one matmul fewer per weight), through a Cholesky factor of T: one
factorization serves every weight that reads the same input (q/k/v, gate/up).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

LOG = logging.getLogger(__name__)


def average(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], compute: torch.dtype
) -> torch.Tensor:
    """The recipe-weighted linear average, in ``compute``."""
    total = sum(weights)
    result = torch.zeros(tensors[0].shape, dtype=compute, device=tensors[0].device)
    for tensor, w in zip(tensors, weights):
        result.add_(tensor.to(compute), alpha=w / total)
    return result


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """:func:`average` in float32 (float64 if an input is), returned in the first's dtype."""
    float64 = any(t.dtype == torch.float64 for t in tensors)
    return average(tensors, weights, torch.float64 if float64 else torch.float32).to(
        tensors[0].dtype
    )


@dataclass
class RegMeanSolver:
    """One input's factorized summed Gram and the scaled Grams ``w_m G~_m`` of all inputs but
    the last (the last one's weight is the anchor of the solve)."""

    scaled: list[torch.Tensor]
    cholesky: torch.Tensor | None = None
    lu: tuple[torch.Tensor, torch.Tensor] | None = None

    def merge(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """W* of ``tensors`` (one per input, in the order of the Grams), in the first's dtype;
        the inputs are never modified."""
        first = tensors[0]
        last = tensors[-1].to(torch.float64, copy=True)
        delta = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for tensor, g in zip(tensors[:-1], self.scaled):
            delta.addmm_(tensor.to(torch.float64, copy=True).sub_(last), g)
        if self.cholesky is not None:
            correction = torch.cholesky_solve(delta.T, self.cholesky).T
        else:
            assert self.lu is not None
            correction = torch.linalg.lu_solve(*self.lu, delta.T).T
        del delta
        return last.add_(correction).to(first.dtype)


def factor_grams(
    grams: Iterable[torch.Tensor], weights: Sequence[float], alpha: float, name: str
) -> RegMeanSolver:
    """The solver for one input from its Grams (float64, consumed: scaled in place), read one
    at a time from an iterable so that a caller streaming them from disk holds M + 1 at most."""
    total: torch.Tensor | None = None
    scaled = []
    for k, (g, w) in enumerate(zip(grams, weights)):
        diagonal = g.diagonal().clone()
        g.mul_(alpha * w).diagonal().add_(diagonal, alpha=(1 - alpha) * w)
        total = g.clone() if total is None else total.add_(g)
        if k < len(weights) - 1:
            scaled.append(g)
        del g
    assert total is not None
    solver = RegMeanSolver(scaled)
    _factorize(solver, total, name)
    return solver


def _factorize(solver: RegMeanSolver, total: torch.Tensor, name: str) -> None:
    """Cholesky of ``total``; with a 1e-10 mean(diag) ridge if singular; LU as a last resort."""
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) == 0 and torch.isfinite(factor).all():
        solver.cholesky = factor
        return
    ridge = 1e-10 * total.diagonal().mean().clamp_min(1e-30)
    LOG.warning(
        "%s: summed Gram is singular (dead inputs?); solving with a %.1e ridge", name, ridge
    )
    total.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) == 0 and torch.isfinite(factor).all():
        solver.cholesky = factor
        return
    lu, pivots, _ = torch.linalg.lu_factor_ex(total)
    solver.lu = (lu, pivots)
