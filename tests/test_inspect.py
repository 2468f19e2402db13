"""`inspect`: natural tensor order, the per-layer mass against a brute-force sum, the picture
and the card that embeds it, and the one-line error without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergekit_fisher.anatomy import mass_table, node_rows
from mergekit_fisher.cli import main
from mergekit_fisher.store import open_store, write_store

LAYERS, HEADS, HEAD_DIM, NEURONS, HIDDEN = 11, 4, 3, 5, 12


pytestmark = pytest.mark.usefixtures("fresh_cache")


def node_store(path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A node store (q rows per head, down columns per neuron) over 11 layers, plus norms."""
    g = torch.Generator().manual_seed(0)
    heads, neurons = (
        torch.rand(LAYERS, HEADS, generator=g),
        torch.rand(LAYERS, NEURONS, generator=g),
    )
    fisher, weights = {}, {}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        fisher[f"{p}.self_attn.q_proj.weight"] = heads[i].repeat_interleave(HEAD_DIM)[:, None]
        fisher[f"{p}.mlp.down_proj.weight"] = neurons[i][None, :]
        if i % 2:  # heads come from o columns; from q rows where o is absent
            fisher[f"{p}.self_attn.o_proj.weight"] = heads[i].repeat_interleave(HEAD_DIM)[None, :]
            weights[f"{p}.self_attn.o_proj.weight"] = torch.randn(HIDDEN, HEADS * HEAD_DIM)
        fisher[f"{p}.input_layernorm.weight"] = torch.rand(HIDDEN, generator=g)
        weights[f"{p}.self_attn.q_proj.weight"] = torch.randn(HEADS * HEAD_DIM, HIDDEN)
        weights[f"{p}.mlp.down_proj.weight"] = torch.randn(HIDDEN, NEURONS)
        weights[f"{p}.input_layernorm.weight"] = torch.randn(HIDDEN)
    fisher["lm_head.weight"] = torch.rand(7, HIDDEN, generator=g)
    weights["lm_head.weight"] = torch.randn(7, HIDDEN)
    write_store(
        path, fisher, weights=weights, model=str(path), granularity="nodes",
        store_dtype=torch.float32,
    )  # fmt: skip
    return path, heads, neurons


def test_mass_and_node_rows_match_brute_force(tmp_path: Path) -> None:
    path, heads, neurons = node_store(tmp_path / "s")
    store = open_store(path)
    table = mass_table(store)
    assert table.layers == [*range(LAYERS), None]
    for i in range(LAYERS):
        q = heads[i].sum().item() * HEAD_DIM * HIDDEN  # broadcast over the q rows' columns
        assert table.cells[(i, "q")] == pytest.approx(q, rel=1e-6)
        assert table.cells[(i, "down")] == pytest.approx(neurons[i].sum().item() * HIDDEN, rel=1e-6)
    assert (None, "embeddings") in table.cells
    torch.testing.assert_close(node_rows(store, "heads"), heads)
    torch.testing.assert_close(node_rows(store, "neurons"), neurons)


def test_inspect_orders_naturally_plots_and_embeds_in_card(tmp_path: Path) -> None:
    path, _, _ = node_store(tmp_path / "s")
    card = (path / "README.md").read_text()
    assert "base_model:" not in card  # a local path is no Hub id
    result = CliRunner().invoke(
        main, ["inspect", str(path), "--tensors", "--plot", str(path / "fisher_mass.png")]
    )
    assert result.exit_code == 0, result.output
    listed = [
        line.split()[0] for line in result.output.splitlines() if line.startswith("model.layers.")
    ]
    layers = [int(name.split(".")[2]) for name in listed]
    assert layers == sorted(layers) and layers[-1] == 10
    assert "layer 10" not in result.output and any(
        line.startswith("10 ") for line in result.output.splitlines()
    )
    assert (path / "fisher_mass.png").stat().st_size > 1000
    assert (
        "![Fisher mass per layer and module](fisher_mass.png)" in (path / "README.md").read_text()
    )


def test_card_links_only_hub_ids(tmp_path: Path) -> None:
    write_store(tmp_path / "h", {"w": torch.rand(2, 2)}, model="org/model")
    assert "base_model: org/model" in (tmp_path / "h" / "README.md").read_text()


def test_plot_without_matplotlib_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, _ = node_store(tmp_path / "s")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(main, ["inspect", str(path), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert 'error: pictures need matplotlib: pip install "mergekit-fisher[demo]"' in result.output
    assert not (tmp_path / "x.png").exists()
