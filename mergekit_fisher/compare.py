"""Where two experts' Fisher stores collide (``mergekit-fisher compare``).

Per (layer, module) cell, over the elements of the weights in it (node stores broadcast to
their weights' shapes):

* Jaccard of the important elements: |A ∩ B| / |A ∪ B| with A the elements of each weight whose
  Fisher is positive and at least the weight's k-th largest value, k = ceil(top * numel) (ties
  at the threshold included, so broadcast values are all in or all out). A high overlap is
  where a Fisher merge must trade one expert's knowledge against the other's.
* The share of elements where each store dominates (F_a > F_b, F_b > F_a); the rest are ties.

Stores are read one tensor at a time, so their size does not matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergekit_fisher.anatomy import Cell, ordered_layers
from mergekit_fisher.errors import FisherError
from mergekit_fisher.layout import MODULES, layer_of, module_of, natural_key
from mergekit_fisher.plot import Panel
from mergekit_fisher.store import FisherStore


class CompareError(FisherError):
    """Two stores that cannot be compared element by element."""


@dataclass
class Overlap:
    """Counts over one cell's elements."""

    elements: int = 0
    top_a: int = 0
    top_b: int = 0
    both: int = 0
    a_wins: int = 0
    b_wins: int = 0

    def add(self, other: Overlap) -> None:
        for key, value in vars(other).items():
            setattr(self, key, getattr(self, key) + value)

    @property
    def jaccard(self) -> float:
        union = self.top_a + self.top_b - self.both
        return self.both / union if union else float("nan")

    def share(self, wins: int) -> float:
        return wins / self.elements if self.elements else float("nan")


def check_comparable(a: FisherStore, b: FisherStore) -> None:
    """Refuse stores that are not Fisher stores of the same tensor names and weight shapes."""
    for store in (a, b):
        if store.statistic != "fisher":
            raise CompareError(f"{store.ref} is a {store.statistic} store: compare needs Fisher")
    only = sorted(set(a.names) ^ set(b.names), key=natural_key)
    if only:
        side = a if only[0] in a.names else b
        raise CompareError(
            f"tensor {only[0]!r} is only in {side.ref} ({len(only)} differ): compare stores "
            "estimated on models of the same base architecture and shapes"
        )
    for name in a.names:
        sa, sb = a.stats(name).weight_shape, b.stats(name).weight_shape
        if sa != sb:
            raise CompareError(
                f"tensor {name!r} describes a {list(sa)} weight in {a.ref} but {list(sb)} in "
                f"{b.ref}: compare stores estimated on models of the same base shapes"
            )


def top_mask(fisher: torch.Tensor, top: float) -> torch.Tensor:
    """The elements at or above the k-th largest value (k = ceil(top * numel)), positive only."""
    flat = fisher.reshape(-1)
    k = min(flat.numel(), max(1, math.ceil(top * flat.numel())))
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    return (fisher >= threshold) & (fisher > 0)


def tensor_overlap(fa: torch.Tensor, fb: torch.Tensor, top: float) -> Overlap:
    """Counts for one weight's Fisher tensors (already broadcast to the weight's shape)."""
    ma, mb = top_mask(fa, top), top_mask(fb, top)
    return Overlap(
        elements=fa.numel(),
        top_a=int(ma.sum()),
        top_b=int(mb.sum()),
        both=int((ma & mb).sum()),
        a_wins=int((fa > fb).sum()),
        b_wins=int((fb > fa).sum()),
    )


def compare_stores(a: FisherStore, b: FisherStore, top: float = 0.01) -> dict[Cell, Overlap]:
    """Overlap per (layer, module), streaming one tensor of each store at a time."""
    if not 0 < top <= 1:
        raise CompareError(f"--top {top} must be a fraction in (0, 1], e.g. 0.01 for the top 1%")
    check_comparable(a, b)
    cells: dict[Cell, Overlap] = {}
    for name in sorted(a.names, key=natural_key):
        shape = a.stats(name).weight_shape
        fa = a.get(name).expand(shape)
        fb = b.get(name).expand(shape)
        cell = cells.setdefault((layer_of(name), module_of(name)), Overlap())
        cell.add(tensor_overlap(fa, fb, top))
    return cells


def layer_lines(cells: dict[Cell, Overlap], a: str, b: str) -> list[str]:
    """One line per layer, pooled over its modules."""
    lines = [f"{'layer':<8} {'jaccard':>8} {'A>B':>7} {'B>A':>7}   (A = {a}, B = {b})"]
    for layer in ordered_layers(cells):
        pooled = Overlap()
        for (row, _), overlap in cells.items():
            if row == layer:
                pooled.add(overlap)
        label = "outside" if layer is None else str(layer)
        lines.append(
            f"{label:<8} {pooled.jaccard:>8.3f} {pooled.share(pooled.a_wins):>7.1%} "
            f"{pooled.share(pooled.b_wins):>7.1%}"
        )
    return lines


def compare_panels(cells: dict[Cell, Overlap], top: float) -> list[Panel]:
    """Two layer x module heatmaps: the top-k Jaccard and the share where A dominates."""
    layers = ordered_layers(cells)
    modules = [m for m in MODULES if any(m == cm for _, cm in cells)]
    labels = ["outside" if layer is None else f"layer {layer}" for layer in layers]

    def grid(value) -> torch.Tensor:  # type: ignore[no-untyped-def]
        nan = float("nan")
        return torch.tensor(
            [[value(cells[(r, m)]) if (r, m) in cells else nan for m in modules] for r in layers]
        )

    return [
        Panel(grid(lambda o: o.jaccard), labels, modules, f"Jaccard of top {top:.2%}", log=False),
        Panel(grid(lambda o: o.share(o.a_wins)), labels, modules, "share F_A > F_B", log=False),
    ]
