"""Gram statistics for RegMean: batched, padded and shared equals a naive per-layer loop; the
store it writes merges through mergekit's `regmean`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import model_tensors, run_recipe, save_tiny_model

from mergekit_fisher.cli import main
from mergekit_fisher.store import open_store

TEXTS = ["12+34=46", "abc def ghi", "hello 77", "zz+1=zz1 and more", "merge me 5", "qq"]


pytestmark = pytest.mark.usefixtures("fresh_cache")


def naive_grams(model_dir: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """One hook per linear layer, batch 1, no padding, float64: sum x x^T / tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def record(m, inputs, out, name=name):  # type: ignore[no-untyped-def]
                x = inputs[0][0].double()
                sums[name] = sums.get(name, 0) + x.T @ x

            handles.append(module.register_forward_hook(record))
    tokens = 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            model(input_ids=ids)
            tokens += ids.shape[1]
    for h in handles:
        h.remove()
    return {f"{name}.weight": total / tokens for name, total in sums.items()}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gram") / "calib.txt"
    path.write_text("\n".join(TEXTS))
    return path


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-7), ("float32", 2e-6)])
def test_gram_store_matches_naive_and_shares_inputs(
    tmp_path: Path, tiny_llama: Path, data_file: Path, dtype: str, tol: float
) -> None:
    """float64 compute keeps float64 sums; float32 compute sums in float32 with addmm_."""
    result = CliRunner().invoke(
        main,
        [
            "estimate",
            str(tiny_llama),
            "--data",
            str(data_file),
            "--out",
            str(tmp_path / "g"),
            "--statistic",
            "gram",
            "--dtype",
            dtype,
            "--store-dtype",
            "float32",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "g")
    assert store.statistic == "gram" and store.config["estimator"]["statistic"] == "gram"
    consumers = store.config["consumers"]
    assert (
        consumers["model.layers.0.self_attn.k_proj.weight"]
        == consumers["model.layers.0.self_attn.q_proj.weight"]
    )
    assert (
        consumers["model.layers.1.mlp.up_proj.weight"]
        == consumers["model.layers.1.mlp.gate_proj.weight"]
    )
    assert len(set(consumers.values())) == 2 * 4 + 1  # per layer: qkv, o, gate/up, down; lm_head
    ref = naive_grams(tiny_llama, TEXTS)
    for weight, key in consumers.items():
        torch.testing.assert_close(
            store.get(key, dtype=torch.float64), ref[weight], rtol=10 * tol, atol=tol
        )


def test_tied_lm_head_is_skipped(tmp_path: Path, data_file: Path) -> None:
    from mergekit_fisher.estimate import estimate_fisher

    path = save_tiny_model(tmp_path / "t", seed=5, tie_word_embeddings=True)
    store = estimate_fisher(
        path, [data_file], tmp_path / "g", statistic="gram", device="cpu", progress=False
    )
    assert store is not None and "lm_head.weight" not in store.config["consumers"]


def test_gram_stores_default_to_float32_and_bfloat16_warns(
    tmp_path: Path, tiny_llama: Path, data_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mergekit_fisher.estimate import estimate_fisher

    common = dict(statistic="gram", device="cpu", progress=False)
    with caplog.at_level("WARNING"):
        default = estimate_fisher(tiny_llama, [data_file], tmp_path / "f32", **common)
    assert default is not None and default.config["store_dtype"] == "float32"
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "f32")])
    assert "statistic    gram (RegMean); stored as float32" in shown.output, shown.output
    assert "--store-dtype bfloat16 for Gram matrices" not in caplog.text
    with caplog.at_level("WARNING"):
        lossy = estimate_fisher(
            tiny_llama, [data_file], tmp_path / "bf16", store_dtype="bfloat16", **common
        )
    assert lossy is not None and lossy.config["store_dtype"] == "bfloat16"
    assert "--store-dtype bfloat16 for Gram matrices" in caplog.text


def test_regmean_merges_real_gram_stores(tmp_path: Path, tiny_llama_pair, data_file: Path) -> None:  # type: ignore[no-untyped-def]
    from mergekit_fisher.estimate import estimate_fisher

    models = list(tiny_llama_pair)
    stores = [
        estimate_fisher(
            m,
            [data_file],
            tmp_path / f"g{i}",
            statistic="gram",
            device="cpu",
            progress=False,
            store_dtype="float32",
        )
        for i, m in enumerate(models)
    ]
    recipe = {
        "merge_method": "regmean",
        "models": [
            {"model": str(m), "parameters": {"gram": str(s.path)}} for m, s in zip(models, stores)
        ],
        "dtype": "float32",
    }
    merged = run_recipe(recipe, tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    grams = [s.get(s.config["consumers"][name], dtype=torch.float64) for s in stores]
    grams = [0.9 * g + 0.1 * torch.diag(torch.diag(g)) for g in grams]
    thetas = [model_tensors(m)[name].double() for m in models]
    ref = (thetas[0] @ grams[0] + thetas[1] @ grams[1]) @ torch.linalg.inv(grams[0] + grams[1])
    torch.testing.assert_close(merged[name].double(), ref, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_is_refused_in_one_line(tmp_path: Path, data_file: Path) -> None:
    """GPT-2's Conv1D weights are [in, out]; regmean solves for [out, in]: refuse, write nothing."""
    path = save_tiny_model(tmp_path / "gpt2", arch="gpt2", seed=5)
    args = ["estimate", str(path), "--data", str(data_file), "--out", str(tmp_path / "g")]
    result = CliRunner().invoke(main, [*args, "--statistic", "gram", "--no-progress"])
    last = result.output.strip().splitlines()[-1]  # above it: transformers' loading bar
    assert result.exit_code == 1 and last.startswith("error: "), result.output
    assert "Conv1D" in last and "--statistic fisher" in last
    assert not (tmp_path / "g").exists()


def test_gram_rows_upcast_unless_tensor_cores_apply() -> None:
    """CPU rows (any dtype) and float32 CUDA rows are multiplied in the accumulator's dtype;
    only half-precision CUDA rows keep their dtype (then ``out_dtype=float32``)."""
    from mergekit_fisher.estimate.gram import gram_rows, tensor_core_gram

    rows = torch.randn(4, 3).bfloat16()
    assert gram_rows(rows, torch.float32).dtype == torch.float32
    assert not tensor_core_gram(rows, torch.float32)
    assert not tensor_core_gram(rows.float(), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_gram_on_tensor_cores_equals_the_float32_product(
    tmp_path: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 model's Grams on tensor cores (bf16 in, float32 out) equal the float32 product
    of the upcast rows up to summation order."""
    from mergekit_fisher.estimate import EstimateConfig, estimate_fisher
    from mergekit_fisher.estimate import gram as gram_module

    path = save_tiny_model(tmp_path / "m", seed=3)
    config = EstimateConfig(statistic="gram", device="cuda", dtype="bfloat16", progress=False)
    fast = estimate_fisher(path, [data_file], tmp_path / "fast", config)
    monkeypatch.setattr(gram_module, "tensor_core_gram", lambda rows, dtype: False)
    slow = estimate_fisher(path, [data_file], tmp_path / "slow", config)
    for key in set(fast.config["consumers"].values()):
        torch.testing.assert_close(fast.get(key), slow.get(key), rtol=1e-5, atol=1e-6)
