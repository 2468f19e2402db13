"""The demo's table rows: the base, one expert per task, and how each merge row is made.

Shared by the run (which makes each row) and the report (which ranks the merge rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mergekit_fisher.demo.tasks import TASKS


@dataclass(frozen=True)
class MergeSpec:
    """How one merge row is made.

    ``store``: the per-expert store it reads (``full``/``nodes`` Fisher, ``gram``), or none.
    ``anchored``: the base takes part as one more Fisher-weighted input (its own store).
    ``searched``: coefficients chosen by ``mergekit_fisher.search`` on the ``valid`` split.
    """

    method: str
    store: str = ""
    anchored: bool = False
    searched: bool = False


SPECS: dict[str, MergeSpec] = {
    "linear": MergeSpec("linear"),
    "task_arithmetic": MergeSpec("task_arithmetic"),
    "ties": MergeSpec("ties"),
    "fisher (full)": MergeSpec("fisher", "full"),
    "fisher (searched)": MergeSpec("fisher", "full", searched=True),
    "fisher (nodes)": MergeSpec("fisher", "nodes"),
    "fisher+base": MergeSpec("fisher", "full", anchored=True),
    "fisher+base (searched)": MergeSpec("fisher", "full", anchored=True, searched=True),
    "regmean": MergeSpec("regmean", "gram"),
}
MERGES = tuple(SPECS)
"""Merge rows, in table order; ``fisher (nodes)`` is dropped when the estimator lacks nodes."""


def model_rows(granularities: Sequence[str] = ("full", "nodes")) -> list[str]:
    """Table rows: base, one expert per task, then every merge."""
    merges = [
        row
        for row, spec in SPECS.items()
        if spec.store not in ("full", "nodes") or spec.store in granularities
    ]
    return ["base", *(f"expert {t.name}" for t in TASKS), *merges]
