"""Exact per-example diagonal Fisher of causal LMs (``full``) and of mask nodes (``nodes``).

Public API: :func:`estimate_fisher` (model + data -> store), :class:`EstimateConfig`,
:func:`compute_fisher` (in-memory, no store), :class:`EstimateError`. Definitions and
tolerances: docs/fisher.md.
"""

from __future__ import annotations

from mergekit_fisher.estimate.config import EstimateConfig, EstimateError
from mergekit_fisher.estimate.engine import example_seed, sample_targets
from mergekit_fisher.estimate.runner import FisherResult, Progress, compute_fisher, estimate_fisher

__all__ = [
    "EstimateConfig",
    "EstimateError",
    "FisherResult",
    "Progress",
    "compute_fisher",
    "estimate_fisher",
    "example_seed",
    "sample_targets",
]
