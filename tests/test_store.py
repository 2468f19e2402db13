"""The Fisher store: layout, atomic writes, lazy reads, statistics, binding, Hub ids, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_fisher.store import (
    CONFIG_NAME,
    INDEX_FILE,
    SINGLE_FILE,
    StoreError,
    binding_matches,
    clear_cache,
    fingerprint,
    open_store,
    write_store,
)

pytestmark = pytest.mark.usefixtures("fresh_cache")


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 6, generator=g),
        "b.weight": torch.randn(6, 8, generator=g),
        "norm.weight": torch.rand(6, generator=g) + 0.5,
    }


def _fisher(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(w.shape, generator=g) ** 3 for n, w in weights.items()}


def test_single_file_layout_stats_and_lazy_reads(tmp_path: Path) -> None:
    weights = _weights()
    fisher = _fisher(weights)
    fisher["a.weight"] = torch.rand(8, 1)  # broadcast rows
    store = write_store(
        tmp_path / "s", fisher, weights=weights, model="m", estimator={"mode": "sampled"}
    )
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "README.md",
        SINGLE_FILE,
        CONFIG_NAME,
    ]
    assert store.names == sorted(fisher)
    on_disk = load_file(str(tmp_path / "s" / SINGLE_FILE))
    assert all(t.dtype == torch.bfloat16 for t in on_disk.values())
    # Statistics are those of the stored (bf16) values, expanded to the weight's shape.
    expected_sumsq = 0.0
    for name, t in on_disk.items():
        expanded = t.double().expand(weights[name].shape)
        stats = store.stats(name)
        assert stats.sum == pytest.approx(float(expanded.sum()), rel=1e-12)
        assert stats.sumsq == pytest.approx(float((expanded**2).sum()), rel=1e-12)
        expected_sumsq += float((expanded**2).sum())
        assert torch.equal(store.get(name), t.float())
    assert store.global_norm == pytest.approx(math.sqrt(expected_sumsq), rel=1e-12)
    assert "mergekit-fisher" in (tmp_path / "s" / "README.md").read_text()


def test_sharded_layout_reads_back(tmp_path: Path) -> None:
    weights = _weights()
    fisher = _fisher(weights)
    store = write_store(
        tmp_path / "s", fisher, weights=weights, shard_size=100, store_dtype=torch.float32
    )
    index = json.loads((tmp_path / "s" / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 3 and all(f.startswith("fisher-0000") for f in files)
    for name, t in fisher.items():
        assert torch.equal(store.get(name), t)


def test_write_is_atomic_and_refuses_overwrite(tmp_path: Path) -> None:
    weights = _weights()
    write_store(tmp_path / "s", _fisher(weights), weights=weights)
    with pytest.raises(StoreError, match="--overwrite"):
        write_store(tmp_path / "s", _fisher(weights), weights=weights)
    bad = _fisher(weights)
    bad["a.weight"][0, 0] = float("nan")
    with pytest.raises(StoreError, match="NaN"):
        write_store(tmp_path / "s", bad, weights=weights, overwrite=True)
    # The failed overwrite left the old store intact and no partial directory behind.
    assert open_store(tmp_path / "s").names == sorted(weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.__setitem__("a.weight", -f["a.weight"]), "negative"),
        (lambda f: f.__setitem__("a.weight", torch.rand(3, 6)), "does not broadcast"),
    ],
)
def test_writer_rejects_bad_fisher(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    weights = _weights()
    fisher = _fisher(weights)
    mutate(fisher)
    with pytest.raises(StoreError, match=message):
        write_store(tmp_path / "s", fisher, weights=weights)
    assert not any(tmp_path.iterdir())


def test_reader_errors_are_one_line(tmp_path: Path) -> None:
    weights = _weights()
    write_store(tmp_path / "s", _fisher(weights), weights=weights)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a Fisher store"):
        open_store(tmp_path / "empty")
    # Truncated tensor file: opening or reading names the file and the fix.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "s", broken)
    data = (broken / SINGLE_FILE).read_bytes()
    (broken / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="corrupt or truncated") as info:
        store = open_store(broken)
        store.get("a.weight")
    assert "\n" not in str(info.value)
    # NaN and negative values written by another tool are refused at read time.
    nan = tmp_path / "nan"
    shutil.copytree(tmp_path / "s", nan)
    tensors = load_file(str(nan / SINGLE_FILE))
    tensors["a.weight"][1, 1] = float("inf")
    tensors["b.weight"][0, 0] = -1.0
    save_file(tensors, str(nan / SINGLE_FILE))
    with pytest.raises(StoreError, match="NaN/Inf"):
        open_store(nan).get("a.weight")
    with pytest.raises(StoreError, match="negative"):
        open_store(nan).get("b.weight")


def test_binding_detects_other_weights_and_tolerates_dtype_casts() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 16, generator=g)
    record = fingerprint(w)
    assert binding_matches(record, w)
    assert binding_matches(record, w.clone())
    assert not binding_matches(record, w[torch.randperm(64, generator=g)])  # permuted vocab
    assert not binding_matches(record, torch.randn(64, 16, generator=g))  # another model
    assert not binding_matches(record, w + 1e-4 * torch.randn(64, 16, generator=g))  # revision
    assert not binding_matches(record, w[:32])  # resized
    # A bf16-estimated store matches the same checkpoint loaded as float32 or float16.
    wb = w.to(torch.bfloat16)
    assert binding_matches(fingerprint(wb), wb.float())
    assert binding_matches(fingerprint(wb), w)
    assert binding_matches(fingerprint(w), wb)
    assert binding_matches(fingerprint(wb), w.half())


def test_locate_finds_remapped_weights(tmp_path: Path) -> None:
    weights = _weights()
    weights["c.weight"] = torch.randn(8, 6)
    store = write_store(tmp_path / "s", _fisher(weights), weights=weights)
    assert store.locate("a.weight", weights["a.weight"]) == "a.weight"
    # The weight of c arriving under a's name (a layer remap) is served by c's Fisher.
    assert store.locate("a.weight", weights["c.weight"]) == "c.weight"
    assert store.locate("a.weight", torch.randn(8, 6)) is None
    unbound = write_store(tmp_path / "u", _fisher(weights))
    assert not unbound.is_bound
    assert unbound.locate("a.weight", torch.randn(8, 6)) == "a.weight"


def _fake_hub_cache(cache: Path, repo: str, store_dir: Path) -> str:
    """Lay ``store_dir`` out as huggingface_hub's cache does for a downloaded model repo."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(store_dir, root / "snapshots" / commit)
    return commit


def test_hub_id_resolves_from_offline_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = _weights()
    fisher = _fisher(weights)
    write_store(tmp_path / "s", fisher, weights=weights, store_dtype=torch.float32)
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/fisher-store", tmp_path / "s")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    store = open_store("someone/fisher-store")
    assert torch.equal(store.get("b.weight"), fisher["b.weight"])
    with pytest.raises(StoreError, match="could not be fetched"):
        open_store("someone/not-cached")


def test_reader_reads_validated_row_blocks(tmp_path: Path) -> None:
    weights = _weights()
    fisher = _fisher(weights)
    store = write_store(tmp_path / "s", fisher, weights=weights, store_dtype=torch.float32)
    with store.reader("b.weight") as read:
        torch.testing.assert_close(read(1, 4), fisher["b.weight"][1:4], rtol=0, atol=0)
        assert read(1, 4).dtype == torch.float32
        torch.testing.assert_close(read(None, None), store.get("b.weight"), rtol=0, atol=0)
    tensors = load_file(str(tmp_path / "s" / SINGLE_FILE))
    tensors["b.weight"][4, 2] = float("nan")
    save_file(tensors, str(tmp_path / "s" / SINGLE_FILE))
    clear_cache()
    with open_store(tmp_path / "s").reader("b.weight") as read:
        assert torch.isfinite(read(0, 4)).all()  # only the block read is checked
        with pytest.raises(StoreError, match="NaN"):
            read(3, 6)
