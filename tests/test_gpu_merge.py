"""Merges under mergekit's ``--cuda``: every method gives its CPU result, and store tensors cross
to the merge's device in their stored dtype, to be converted there (a CPU bf16 tensor sent with
``.to(device="cuda", dtype=torch.float32)`` is converted on the CPU first: issue 21).

The conversion order is pinned on any machine: ``Tensor.to`` calls are recorded, and moves to a
CUDA device are done on the CPU where there is none. The GPU comparisons need CUDA."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_methods_fisher_arithmetic
import torch
from conftest import fisher_recipe, make_store, model_tensors, requires_cuda, run_recipe
from test_methods_fisher_arithmetic import _stores
from test_methods_fisher_arithmetic import recipe as task_recipe
from test_methods_regmean import make_gram_store, regmean_recipe
from torch.overrides import TorchFunctionMode

from mergekit_fisher.store import FisherStore, open_store, to_device

family = test_methods_fisher_arithmetic.family  # a base and three experts: the shared fixture

Move = tuple[torch.dtype, str, str | None, torch.dtype | None]
"""One ``Tensor.to``: source dtype, source device type, target device type, target dtype."""


pytestmark = pytest.mark.usefixtures("fresh_cache")


class MoveRecorder(TorchFunctionMode):
    """Records every ``Tensor.to``. Moves to device type ``fake`` happen on the CPU instead, so
    that code written for a GPU runs here and its moves can be checked."""

    def __init__(self, fake: str | None = None) -> None:
        super().__init__()
        self.fake = fake
        self.moves: list[Move] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            source = args[0]
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            target = None if device is None else device.type
            self.moves.append((source.dtype, source.device.type, target, dtype))
            if target is not None and target == self.fake:
                return source.clone() if dtype is None else source.to(dtype)
        return func(*args, **kwargs)


def test_to_device_moves_in_the_stored_dtype_then_converts_there() -> None:
    tensor = torch.rand(4, 3).to(torch.bfloat16)
    with MoveRecorder() as recorder:
        moved = to_device(tensor, torch.device("meta"), torch.float32)
    assert (moved.device.type, moved.dtype) == ("meta", torch.float32)
    assert recorder.moves == [
        (torch.bfloat16, "cpu", "meta", None),
        (torch.bfloat16, "meta", None, torch.float32),
    ]
    assert to_device(tensor, None) is tensor
    torch.testing.assert_close(to_device(tensor, "cpu", torch.float32), tensor.float())


def test_store_reads_cross_to_the_gpu_in_the_stored_dtype(tmp_path: Path, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """``get`` and ``reader`` onto a (recorded, CPU-backed) CUDA device: every move carries bf16."""
    store = open_store(make_store(tiny_llama, tmp_path / "f", seed=0))
    name = "model.layers.0.mlp.down_proj.weight"
    expected = store.get(name)
    with MoveRecorder(fake="cuda") as recorder:
        whole = store.get(name, device="cuda", dtype=torch.float32)
        with store.reader(name, device=torch.device("cuda"), dtype=torch.float64) as read:
            rows = read(2, 5)
    torch.testing.assert_close(whole, expected, rtol=0, atol=0)
    torch.testing.assert_close(rows, expected[2:5].double(), rtol=0, atol=0)
    crossings = [m for m in recorder.moves if m[2] == "cuda"]
    assert len(crossings) == 2, recorder.moves
    assert all(m[0] == torch.bfloat16 and m[3] is None for m in crossings), crossings


# ------------------------------------------------------------------ every method, CPU and GPU

METHODS = ("fisher", "fisher_nodes", "regmean", "fisher_arithmetic", "fisher_ties")


def method_recipe(
    method: str, root: Path, pair: tuple[Path, Path], family: tuple[Path, list[Path]]
) -> dict[str, Any]:
    """A float32 recipe of ``method`` over the shared tiny models, with bf16 (Fisher) or float32
    (Gram) stores: every store read converts."""
    models = list(pair)
    if method == "fisher":
        stores = [make_store(m, root / f"f{i}", seed=i) for i, m in enumerate(models)]
        return fisher_recipe(models, stores, [1.0, 3.0])
    if method == "fisher_nodes":
        names = sorted(model_tensors(models[0]))
        rows = tuple(n for n in names if n.endswith(("q_proj.weight", "up_proj.weight")))
        columns = tuple(n for n in names if n.endswith(("o_proj.weight", "down_proj.weight")))
        dropped = tuple(n for n in names if "norm" in n or "embed" in n)
        stores = [
            make_store(
                m,
                root / f"n{i}",
                seed=i,
                broadcast=rows,
                broadcast_columns=columns,
                drop=dropped,
                granularity="nodes",
            )
            for i, m in enumerate(models)
        ]
        return fisher_recipe(models, stores, [1.0, 2.0])
    if method == "regmean":
        stores = [make_gram_store(m, root / f"g{i}", seed=i) for i, m in enumerate(models)]
        return regmean_recipe(models, stores, [1.0, 2.0], alpha=0.9)
    base, experts = family[0], family[1][:2]
    config = task_recipe(base, experts, _stores(experts, root), weights=[1.0, 0.5])
    if method == "fisher_ties":
        config["merge_method"] = "fisher_ties"
        for model in config["models"]:
            model["parameters"]["density"] = 0.5
    return config


def spy_readers(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The ``device`` of every store read (``get`` reads through ``reader`` too)."""
    devices: list[object] = []
    reader: Callable[..., Any] = FisherStore.reader

    def spy(self: FisherStore, name: str, device: object = None, dtype: object = None) -> Any:
        devices.append(device)
        return reader(self, name, device=device, dtype=dtype)

    monkeypatch.setattr(FisherStore, "reader", spy)
    return devices


@pytest.mark.parametrize("rows", [False, True], ids=["whole", "rows"])
@pytest.mark.parametrize("method", METHODS)
def test_every_store_read_names_the_merge_device(
    tmp_path: Path,
    tiny_llama_pair,
    family,
    method: str,
    rows: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    """Methods hand the device to the store, which moves before converting (above); a method
    that read on the CPU and converted itself would skip that."""
    from mergekit_fisher.methods import common

    if rows:
        monkeypatch.setattr(common, "CHUNK_ELEMENTS", 37)
    config = method_recipe(method, tmp_path, tiny_llama_pair, family)
    devices = spy_readers(monkeypatch)
    run_recipe(config, tmp_path / "out")
    assert devices and all(d is not None for d in devices), devices


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "options",
    [{}, {"read_to_gpu": True, "low_cpu_memory": True}],
    ids=["cuda", "cuda-read-to-gpu"],
)
@pytest.mark.parametrize("method", METHODS)
def test_cuda_merge_equals_cpu_merge(
    tmp_path: Path, tiny_llama_pair, family, method: str, options: dict[str, bool]
) -> None:  # type: ignore[no-untyped-def]
    config = method_recipe(method, tmp_path, tiny_llama_pair, family)
    cpu = run_recipe(config, tmp_path / "cpu")
    gpu = run_recipe(config, tmp_path / "gpu", cuda=True, **options)
    assert set(gpu) == set(cpu)
    for name, value in cpu.items():
        assert gpu[name].dtype == value.dtype, name
        torch.testing.assert_close(gpu[name], value, rtol=1e-5, atol=1e-6, msg=name)
