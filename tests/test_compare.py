"""`compare`: per layer x module overlap of two stores against a brute-force count over sorted
elements, the CLI, and one-line refusals of stores that do not line up."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_store, stored_fisher

from mergekit_fisher.cli import main
from mergekit_fisher.compare import compare_stores
from mergekit_fisher.layout import layer_of, module_of
from mergekit_fisher.store import open_store

ROWS = ("model.layers.0.self_attn.q_proj.weight",)  # a node-store-like [out, 1] tensor


pytestmark = pytest.mark.usefixtures("fresh_cache")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cmp")
    common = dict(broadcast=ROWS, store_dtype=torch.float32)
    return (
        make_store(tiny_llama, root / "a", seed=1, **common),
        make_store(tiny_llama, root / "b", seed=2, **common),
    )


def brute_force(fa: torch.Tensor, fb: torch.Tensor, top: float) -> tuple[int, int, int, int, int]:
    """(|A|, |B|, |A and B|, #a>b, #b>a) by sorting every element, as Python sets."""

    def important(f: torch.Tensor) -> set[int]:
        values = f.flatten().tolist()
        k = max(1, math.ceil(top * len(values)))
        threshold = sorted(values, reverse=True)[k - 1]
        return {i for i, v in enumerate(values) if v >= threshold and v > 0}

    a, b = important(fa), important(fb)
    pairs = list(zip(fa.flatten().tolist(), fb.flatten().tolist()))
    return len(a), len(b), len(a & b), sum(x > y for x, y in pairs), sum(y > x for x, y in pairs)


@pytest.mark.parametrize("top", [0.01, 0.2])
def test_overlap_matches_brute_force(stores: tuple[Path, Path], top: float) -> None:
    a, b = stores
    cells = compare_stores(open_store(a), open_store(b), top)
    ta, tb = stored_fisher(a), stored_fisher(b)
    shapes = {n: open_store(a).stats(n).weight_shape for n in ta}
    expected: dict[tuple, list[int]] = {}
    for name in ta:  # grouping by name only; the counts are the brute force's
        counts = brute_force(ta[name].expand(shapes[name]), tb[name].expand(shapes[name]), top)
        cell = expected.setdefault((layer_of(name), module_of(name)), [0] * 6)
        for i, value in enumerate((*counts, math.prod(shapes[name]))):
            cell[i] += value
    assert set(cells) == set(expected) and (0, "q") in cells and (None, "embeddings") in cells
    for key, (top_a, top_b, both, a_wins, b_wins, elements) in expected.items():
        got = cells[key]
        assert (got.top_a, got.top_b, got.both) == (top_a, top_b, both), key
        assert (got.a_wins, got.b_wins, got.elements) == (a_wins, b_wins, elements), key


def test_cli_prints_layers_and_plots(stores: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = stores
    out = tmp_path / "cmp.png"
    result = CliRunner().invoke(
        main, ["compare", str(a), str(b), "--top", "0.05", "--plot", str(out)]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert (
        lines[0].startswith("layer")
        and lines[1].startswith("0 ")
        and lines[3].startswith("outside")
    )
    assert out.stat().st_size > 1000


def test_stores_that_do_not_line_up_are_refused(tmp_path: Path, tiny_llama: Path) -> None:
    a = make_store(tiny_llama, tmp_path / "a", seed=1)
    b = make_store(tiny_llama, tmp_path / "b", seed=2, drop=("model.norm.weight",))
    for args in (["compare", str(a), str(b)], ["compare", str(a), str(a), "--top", "0"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert (
        "'model.norm.weight' is only in"
        in CliRunner().invoke(main, ["compare", str(a), str(b)]).output
    )
