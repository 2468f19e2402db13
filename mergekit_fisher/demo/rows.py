"""The demo's table rows: the base, one expert per task, and how each merge row is made.

Shared by the run (which makes each row) and the report (which ranks the merge rows). A new
merge row is one ``SPECS`` line: the recipe is derived from its ``MergeSpec``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mergekit_fisher.demo.tasks import TASKS


@dataclass(frozen=True)
class MergeSpec:
    """How one merge row is made.

    ``store``: the per-expert store it reads (``full``/``nodes`` Fisher, ``gram``), or none.
    ``task_vectors``: the base is ``base_model``, the origin of the experts' task vectors (it
    needs no store). ``anchored``: the base takes part as one more Fisher-weighted input (its
    own store). ``trimmed``: each expert gets ``DemoSettings.ties_density`` (mergekit's default
    1.0 trims nothing). ``weighted``: the method takes a per-model ``weight`` (karcher does
    not). ``search``: what ``mergekit_fisher.search`` chooses on the ``valid`` split before the
    merge (``"weights"``: the recipe weights, over ``DemoSettings.search_weights``;
    ``"methods"``: the method and its parameters, from ``search --methods`` with ``method`` as
    the list, each expert offering its ``full`` and ``gram`` stores), or nothing.
    """

    method: str
    store: str = ""
    task_vectors: bool = False
    anchored: bool = False
    trimmed: bool = False
    weighted: bool = True
    search: Literal["", "weights", "methods"] = ""


SPECS: dict[str, MergeSpec] = {
    "linear": MergeSpec("linear"),
    "karcher": MergeSpec("karcher", weighted=False),
    "task_arithmetic": MergeSpec("task_arithmetic", task_vectors=True),
    "ties": MergeSpec("ties", task_vectors=True, trimmed=True),
    "dare_ties": MergeSpec("dare_ties", task_vectors=True, trimmed=True),
    "fisher (full)": MergeSpec("fisher", "full"),
    "fisher (searched)": MergeSpec("fisher", "full", search="weights"),
    "fisher (nodes)": MergeSpec("fisher", "nodes"),
    "fisher+base": MergeSpec("fisher", "full", anchored=True),
    "fisher+base (searched)": MergeSpec("fisher", "full", anchored=True, search="weights"),
    "regmean": MergeSpec("regmean", "gram"),
    "fisher_arithmetic": MergeSpec("fisher_arithmetic", "full", task_vectors=True),
    "fisher_ties": MergeSpec("fisher_ties", "full", task_vectors=True),
    "search (all methods)": MergeSpec("all", search="methods"),
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
