"""Where a Fisher store's mass sits: per layer x module, and per head / neuron for node stores.

The layer x module table comes from the per-tensor sums in ``fisher_config.json`` (no tensor
read), so it is instant for any store size. The per-head and per-neuron rows of a node store
need its tensors, which are vectors ([out, 1] / [1, in]) and cheap to read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mergekit_fisher.errors import FisherError
from mergekit_fisher.layout import MODULES, layer_of, module_of
from mergekit_fisher.plot import Panel
from mergekit_fisher.store import FisherStore

Cell = tuple[int | None, str]


@dataclass(frozen=True)
class MassTable:
    """Summed values per (layer, module); layer ``None`` holds what sits outside the layers."""

    layers: list[int | None]
    modules: list[str]
    cells: dict[Cell, float]

    def row(self, layer: int | None) -> list[float]:
        return [self.cells.get((layer, m), 0.0) for m in self.modules]

    @property
    def total(self) -> float:
        return sum(self.cells.values())


def ordered_layers(cells: Iterable[Cell]) -> list[int | None]:
    """The layers of ``cells`` in order, the outside-layer row (``None``) last."""
    layers = {layer for layer, _ in cells}
    numbered = sorted(layer for layer in layers if layer is not None)
    return [*numbered, *([None] if None in layers else [])]


def table_of(values: dict[str, float]) -> MassTable:
    """Group per-weight values by (layer, module): layers in order, outside-layer row last."""
    cells: dict[Cell, float] = {}
    for name, value in values.items():
        key = (layer_of(name), module_of(name))
        cells[key] = cells.get(key, 0.0) + value
    present = {m for _, m in cells}
    return MassTable(ordered_layers(cells), [m for m in MODULES if m in present], cells)


def mass_table(store: FisherStore) -> MassTable:
    """Fisher mass (sum over a weight's elements) per layer x module, from the statistics."""
    if store.statistic != "fisher":
        raise FisherError(
            f"{store.ref} is a {store.statistic} store: Fisher mass pictures need a Fisher store"
        )
    return table_of({name: store.stats(name).sum for name in store.names})


def layer_summary(table: MassTable) -> list[str]:
    """One line per layer: its mass, share of the total, and its heaviest module."""
    total = table.total or 1.0
    lines = [f"{'layer':<8} {'mass':>11} {'share':>7}  heaviest"]
    for layer in table.layers:
        row = table.row(layer)
        top = max(range(len(row)), key=row.__getitem__)
        label = "outside" if layer is None else str(layer)
        lines.append(
            f"{label:<8} {sum(row):>11.4g} {sum(row) / total:>7.1%}  {table.modules[top]} "
            f"({row[top] / (sum(row) or 1.0):.0%})"
        )
    return lines


def _heads(rows: torch.Tensor) -> torch.Tensor:
    """Per-head values of a node store's q rows (each head's value repeated head_dim times)."""
    _, counts = torch.unique_consecutive(rows, return_counts=True)
    head_dim = math.gcd(*(int(c) for c in counts))
    return rows.view(-1, head_dim)[:, 0]


def _layer_vectors(store: FisherStore, module: str) -> dict[int, torch.Tensor]:
    """Each layer's flattened ``module`` weight tensor (node stores: vectors, cheap to read)."""
    out = {}
    for name in store.names:
        layer = layer_of(name)
        if layer is not None and module_of(name) == module and name.endswith("weight"):
            out[layer] = store.get(name).flatten()
    return out


def node_rows(store: FisherStore, nodes: str) -> torch.Tensor:
    """[layers, nodes] values of a node store, ``nodes`` = "heads" or "neurons": heads from the
    o columns (a layer's q rows where its o holds one mean, ``--node-mapping paper``), neurons from
    the down columns. Layers whose node counts differ are padded with NaN (drawn blank)."""
    if store.granularity != "nodes":
        raise FisherError(f"{store.ref} is a {store.granularity} store: node pictures need nodes")
    if nodes == "neurons":
        per_layer = _layer_vectors(store, "down")
    else:
        o, q = _layer_vectors(store, "o"), _layer_vectors(store, "q")
        per_layer = {}
        for layer in {*o, *q}:
            per_head = layer in o and (o[layer].numel() > 1 or layer not in q)
            per_layer[layer] = _heads(o[layer] if per_head else q[layer])
    if not per_layer:
        raise FisherError(f"{store.ref} has no per-{nodes[:-1]} tensors to draw")
    width = max(v.numel() for v in per_layer.values())
    out = torch.full((max(per_layer) + 1, width), float("nan"))
    for layer, values in per_layer.items():
        out[layer, : values.numel()] = values
    return out


def _labels(table: MassTable) -> list[str]:
    return ["outside" if layer is None else f"layer {layer}" for layer in table.layers]


def store_panels(store: FisherStore) -> list[Panel]:
    """The mass per layer x module; for a node store also per head and per neuron."""
    table = mass_table(store)
    values = torch.tensor([table.row(layer) for layer in table.layers])
    panels = [
        Panel(values, _labels(table), table.modules, f"Fisher mass: {store.model}", label="sum F")
    ]
    if store.granularity == "nodes":
        for nodes, what in (("heads", "head"), ("neurons", "neuron")):
            rows = node_rows(store, nodes)
            labels = [f"layer {i}" for i in range(rows.shape[0])]
            panels.append(Panel(rows, labels, None, f"Fisher per {what} (x: {what})", label="F"))
    return panels
