"""The `fisher` merge method through mergekit's real pipeline, against a dense float64 reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    fisher_recipe,
    make_store,
    model_tensors,
    requires_cuda,
    run_recipe,
    save_tiny_model,
    stored_fisher,
)
from safetensors.torch import load_file, save_file

from mergekit_fisher.store import SINGLE_FILE, StoreError, write_store

BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("fresh_cache")


@pytest.fixture(params=["whole", "rows"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Both CPU paths of the kernel: whole tensors, and blocks of rows (with a chunk so small
    that tiny tensors span many blocks, a ragged last one included)."""
    from mergekit_fisher.methods import common, fisher

    calls = []
    if request.param == "rows":
        merge_by_rows = fisher._merge_by_rows

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(1)
            return merge_by_rows(*args, **kwargs)

        monkeypatch.setattr(common, "CHUNK_ELEMENTS", 37)
        monkeypatch.setattr(fisher, "_merge_by_rows", counted)
    yield request.param
    assert bool(calls) == (request.param == "rows")


def reference(
    models: list[Path],
    stores: list[Path],
    weights: list[float],
    *,
    normalize: bool,
    epsilon: float,
) -> dict[str, torch.Tensor]:
    """theta* = sum w (F + eps) theta / sum w (F + eps), dense, float64; linear where 0/0."""
    thetas = [model_tensors(m) for m in models]
    fishers = [stored_fisher(s) for s in stores]
    return dense_reference(thetas, fishers, weights, normalize=normalize, epsilon=epsilon)


def dense_reference(
    thetas: list[dict[str, torch.Tensor]],
    fishers: list[dict[str, torch.Tensor]],
    weights: list[float],
    *,
    normalize: bool,
    epsilon: float,
) -> dict[str, torch.Tensor]:
    """``reference`` on tensors in memory (e.g. MoE weights under their fused names)."""
    norms = [
        math.sqrt(sum(float((f[n].double().expand(t[n].shape) ** 2).sum()) for n in f))
        for f, t in zip(fishers, thetas)
    ]
    out = {}
    for name in thetas[0]:
        num = torch.zeros(thetas[0][name].shape, dtype=torch.float64)
        den = torch.zeros_like(num)
        lin = torch.zeros_like(num)
        for theta, fisher, norm, w in zip(thetas, fishers, norms, weights):
            f = fisher[name].double().expand(num.shape)
            f = f / norm if normalize else f
            num += w * (f + epsilon) * theta[name].double()
            den += w * (f + epsilon)
            lin += w * theta[name].double() / sum(weights)
        out[name] = torch.where(den > 0, num / torch.where(den > 0, den, 1), lin)
    return out


def assert_close(
    merged: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = 2e-6
) -> None:
    assert set(merged) == set(ref)
    for name, tensor in merged.items():
        assert torch.isfinite(tensor).all(), name
        torch.testing.assert_close(tensor.double(), ref[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize(
    ("n_models", "weights", "normalize", "epsilon"),
    [
        (2, [1.0, 3.0], True, 0.0),
        (2, [0.5, 0.5], False, 1e-3),
        (3, [1.0, 2.0, 0.5], True, 1e-8),
    ],
)
def test_merge_matches_dense_reference(
    kernel_path: str,
    tmp_path: Path,
    tiny_llama_pair: tuple[Path, Path],
    n_models: int,
    weights: list[float],
    normalize: bool,
    epsilon: float,
) -> None:
    models = list(tiny_llama_pair)
    if n_models == 3:
        models.append(save_tiny_model(tmp_path / "c", seed=3))
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    merged = run_recipe(
        fisher_recipe(models, stores, weights, normalize=normalize, epsilon=epsilon),
        tmp_path / "out",
    )
    assert_close(merged, reference(models, stores, weights, normalize=normalize, epsilon=epsilon))


def test_zero_fisher_everywhere_gives_linear_average(
    kernel_path: str, tmp_path: Path, tiny_llama_pair
) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    stores = [
        make_store(m, tmp_path / f"f{i}", seed=i, zero_fraction=0.7) for i, m in enumerate(models)
    ]
    merged = run_recipe(fisher_recipe(models, stores, [1.0, 2.0], epsilon=0.0), tmp_path / "out")
    ref = reference(models, stores, [1.0, 2.0], normalize=True, epsilon=0.0)
    assert_close(merged, ref)
    # Sanity of the reference itself: some elements are 0/0 and took the linear average.
    a, b = (model_tensors(m)["model.layers.0.mlp.up_proj.weight"].double() for m in models)
    fa, fb = (stored_fisher(s)["model.layers.0.mlp.up_proj.weight"] for s in stores)
    both_zero = (fa == 0) & (fb == 0)
    assert both_zero.any()
    torch.testing.assert_close(
        merged["model.layers.0.mlp.up_proj.weight"].double()[both_zero],
        ((a + 2 * b) / 3)[both_zero],
    )


def test_broadcast_and_sharded_stores(kernel_path: str, tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    rows = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
    columns = ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.up_proj.weight")
    stores = [
        make_store(models[0], tmp_path / "f0", seed=0, broadcast=rows, broadcast_columns=columns),
        make_store(models[1], tmp_path / "f1", seed=1, shard_size=4096, store_dtype=torch.float32),
    ]
    assert len(list((tmp_path / "f1").glob("fisher-*.safetensors"))) > 1
    merged = run_recipe(fisher_recipe(models, stores, [1.0, 1.0]), tmp_path / "out")
    assert_close(merged, reference(models, stores, [1.0, 1.0], normalize=True, epsilon=1e-8))


def test_bf16_checkpoints_keep_their_dtype(kernel_path: str, tmp_path: Path) -> None:
    models = [
        save_tiny_model(tmp_path / n, seed=s, dtype=torch.bfloat16) for n, s in (("a", 1), ("b", 2))
    ]
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    recipe = fisher_recipe(models, stores, [1.0, 1.0])
    del recipe["dtype"]
    merged = run_recipe(recipe, tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    ref = reference(models, stores, [1.0, 1.0], normalize=True, epsilon=1e-8)
    for name, tensor in merged.items():
        torch.testing.assert_close(
            tensor.double(), ref[name].bfloat16().double(), rtol=1e-2, atol=1e-3
        )
    recipe["out_dtype"] = "float32"
    recipe["dtype"] = "float32"
    assert_close(run_recipe(recipe, tmp_path / "out32"), ref)


def test_base_model_is_an_input_with_its_own_store(
    kernel_path: str, tmp_path: Path, tiny_llama_pair
) -> None:  # type: ignore[no-untyped-def]
    base = save_tiny_model(tmp_path / "base", seed=9)
    models = [*tiny_llama_pair, base]
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    recipe = fisher_recipe(models, stores, [1.0, 1.0, 0.5])
    recipe["base_model"] = str(base)
    merged = run_recipe(recipe, tmp_path / "out")
    assert_close(merged, reference(models, stores, [1.0, 1.0, 0.5], normalize=True, epsilon=1e-8))


def test_slices_with_shifted_layers_use_the_input_layers_fisher(
    kernel_path: str, tmp_path: Path
) -> None:
    a = save_tiny_model(tmp_path / "a4", seed=1, num_hidden_layers=4)
    b = save_tiny_model(tmp_path / "b4", seed=2, num_hidden_layers=4)
    fa, fb = make_store(a, tmp_path / "fa", seed=0), make_store(b, tmp_path / "fb", seed=1)
    recipe = {
        "merge_method": "fisher",
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [2, 4], "parameters": {"fisher": str(fa)}},
                    {"model": str(b), "layer_range": [0, 2], "parameters": {"fisher": str(fb)}},
                ]
            }
        ],
        "dtype": "float32",
    }
    merged = run_recipe(recipe, tmp_path / "out")
    # Output layer i comes from a's layer i+2 and b's layer i: rename and compare densely.
    ta, tb = model_tensors(a), model_tensors(b)
    sa, sb = stored_fisher(fa), stored_fisher(fb)
    na = math.sqrt(sum(float((t.double() ** 2).sum()) for t in sa.values()))
    nb = math.sqrt(sum(float((t.double() ** 2).sum()) for t in sb.values()))
    checked = 0
    for name, tensor in merged.items():
        if ".layers." not in name:
            continue
        i = int(name.split(".layers.")[1].split(".")[0])
        src_a = name.replace(f".layers.{i}.", f".layers.{i + 2}.")
        wa, wb = sa[src_a].double() / na + 1e-8, sb[name].double() / nb + 1e-8
        ref = (wa * ta[src_a].double() + wb * tb[name].double()) / (wa + wb)
        torch.testing.assert_close(tensor.double(), ref, rtol=2e-6, atol=2e-6)
        checked += 1
    assert checked == 2 * 9


def test_mixed_tied_lm_head_uses_the_embedding_fisher(kernel_path: str, tmp_path: Path) -> None:
    tied = save_tiny_model(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    untied = save_tiny_model(tmp_path / "untied", seed=2)
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate((untied, tied))]
    assert "lm_head.weight" not in stored_fisher(stores[1])
    merged = run_recipe(fisher_recipe([untied, tied], stores, [1.0, 1.0]), tmp_path / "out")
    f_u, f_t = stored_fisher(stores[0]), stored_fisher(stores[1])
    n_u = math.sqrt(sum(float((t.double() ** 2).sum()) for t in f_u.values()))
    n_t = math.sqrt(sum(float((t.double() ** 2).sum()) for t in f_t.values()))
    wu = f_u["lm_head.weight"].double() / n_u + 1e-8
    wt = f_t["model.embed_tokens.weight"].double() / n_t + 1e-8
    theta_t = model_tensors(tied)["model.embed_tokens.weight"].double()
    ref = (wu * model_tensors(untied)["lm_head.weight"].double() + wt * theta_t) / (wu + wt)
    torch.testing.assert_close(merged["lm_head.weight"].double(), ref, rtol=2e-6, atol=2e-6)


def test_mergekit_options_do_not_change_the_result(tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    recipe = fisher_recipe(models, stores, [1.0, 2.0])
    plain = run_recipe(recipe, tmp_path / "plain")
    options = run_recipe(recipe, tmp_path / "opts", low_cpu_memory=True, out_shard_size=20_000)
    assert len(list((tmp_path / "opts").glob("*.safetensors"))) > 1
    for name, tensor in plain.items():
        assert torch.equal(tensor, options[name]), name


def test_missing_tensor_error_and_uniform(
    kernel_path: str, tmp_path: Path, tiny_llama_pair
) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    dropped = "model.layers.1.mlp.gate_proj.weight"
    stores = [
        make_store(models[0], tmp_path / "f0", seed=0, drop=(dropped,)),
        make_store(models[1], tmp_path / "f1", seed=1),
    ]
    with pytest.raises(StoreError, match=f"no tensor for '{dropped}'.*missing: uniform"):
        run_recipe(fisher_recipe(models, stores, [1.0, 3.0]), tmp_path / "out")
    merged = run_recipe(
        fisher_recipe(models, stores, [1.0, 3.0], missing="uniform"), tmp_path / "out2"
    )
    a, b = (model_tensors(m)[dropped] for m in models)
    torch.testing.assert_close(merged[dropped], (a + 3 * b) / 4)


def test_error_store_bound_to_other_weights(tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    a, b = tiny_llama_pair
    store_a = make_store(a, tmp_path / "fa", seed=0)
    with pytest.raises(StoreError, match="computed on other weights"):
        run_recipe(fisher_recipe([a, b], [store_a, store_a], [1.0, 1.0]), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the failed merge created it, and removed it
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="computed on other weights"):
        run_recipe(fisher_recipe([a, b], [store_a, store_a], [1.0, 1.0]), kept)
    assert (kept / "notes.txt").read_text() == "mine"  # a directory that was there stays


def test_error_shape_does_not_broadcast(tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    a, b = tiny_llama_pair
    wide = save_tiny_model(tmp_path / "wide", seed=5, intermediate_size=40)
    weights = model_tensors(wide)
    write_store(tmp_path / "unbound", {n: torch.rand(w.shape) for n, w in weights.items()})
    store_a = make_store(a, tmp_path / "fa", seed=0)
    with pytest.raises(StoreError, match="does not broadcast"):
        run_recipe(
            fisher_recipe([a, b], [store_a, tmp_path / "unbound"], [1.0, 1.0]), tmp_path / "out"
        )


def test_error_nan_in_store(kernel_path: str, tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    a, b = tiny_llama_pair
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate((a, b))]
    tensors = load_file(str(stores[1] / SINGLE_FILE))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")  # a later row block
    save_file(tensors, str(stores[1] / SINGLE_FILE))
    with pytest.raises(StoreError, match="NaN"):
        run_recipe(fisher_recipe([a, b], stores, [1.0, 1.0]), tmp_path / "out")


# ---------------------------------------------------------------- the command-line paths


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=600)


@pytest.fixture(scope="module")
def pair_with_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("cli")
    models = [save_tiny_model(root / "a", seed=1), save_tiny_model(root / "b", seed=2)]
    stores = [make_store(m, root / f"f{i}", seed=i) for i, m in enumerate(models)]
    return models, stores


def test_plain_mergekit_yaml_finds_fisher(tmp_path: Path, pair_with_stores) -> None:  # type: ignore[no-untyped-def]
    models, stores = pair_with_stores
    recipe = write_recipe(tmp_path / "r.yml", fisher_recipe(models, stores, [1.0, 2.0]))
    result = run_cli(
        str(BIN / "mergekit-yaml"), str(recipe), str(tmp_path / "out"), "--no-copy-tokenizer"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert_close(
        model_tensors(tmp_path / "out"),
        reference(models, stores, [1.0, 2.0], normalize=True, epsilon=1e-8),
    )
    off = run_cli(
        str(BIN / "mergekit-yaml"),
        str(recipe),
        str(tmp_path / "off"),
        env={"MERGEKIT_FISHER_AUTOLOAD": "0"},
    )
    assert off.returncode != 0 and "Unimplemented merge method fisher" in off.stderr


def test_plain_mergekit_yaml_refuses_unknown_parameter(tmp_path: Path, pair_with_stores) -> None:  # type: ignore[no-untyped-def]
    models, stores = pair_with_stores
    recipe = fisher_recipe(models, stores, [1.0, 1.0])
    recipe["models"][0]["parameters"]["wieght"] = 2.0
    result = run_cli(
        str(BIN / "mergekit-yaml"),
        str(write_recipe(tmp_path / "r.yml", recipe)),
        str(tmp_path / "out"),
    )
    assert result.returncode != 0
    assert "unknown parameter(s) ['wieght']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_plain_mergekit_yaml_negative_weight_is_one_line(tmp_path: Path, pair_with_stores) -> None:  # type: ignore[no-untyped-def]
    models, stores = pair_with_stores
    recipe = fisher_recipe(models, stores, [1.0, -1.0])
    result = run_cli(
        str(BIN / "mergekit-yaml"),
        str(write_recipe(tmp_path / "r.yml", recipe)),
        str(tmp_path / "out"),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"weight -1.0 in model {models[1]}" in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_plain_mergekit_yaml_mid_merge_error_is_one_line_and_leaves_nothing(
    tmp_path: Path, pair_with_stores
) -> None:  # type: ignore[no-untyped-def]
    models, stores = pair_with_stores
    # Model b with model a's store: only the binding, met tensor by tensor, can tell.
    recipe = fisher_recipe(models, [stores[0], stores[0]], [1.0, 1.0])
    result = run_cli(
        str(BIN / "mergekit-yaml"),
        str(write_recipe(tmp_path / "r.yml", recipe)),
        str(tmp_path / "out"),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "was computed on other weights" in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r, s: r["models"][1]["parameters"].pop("fisher"), "has no `fisher` parameter"),
        (
            lambda r, s: r["models"][1]["parameters"].update(fisher=str(s / "nope")),
            "does not exist",
        ),
        (lambda r, s: r["parameters"].update(normalise=True), "unknown parameter(s) ['normalise']"),
        (lambda r, s: r["models"][1]["parameters"].update(weight=-0.5), "weight -0.5 in model"),
    ],
)
def test_fisher_merge_cli_errors_are_one_line_and_write_nothing(
    tmp_path: Path,
    pair_with_stores,
    mutate,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    models, stores = pair_with_stores
    recipe = fisher_recipe(models, stores, [1.0, 1.0])
    mutate(recipe, tmp_path)
    result = run_cli(
        str(BIN / "mergekit-fisher"),
        "merge",
        str(write_recipe(tmp_path / "r.yml", recipe)),
        str(tmp_path / "out"),
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "out").exists()


def test_fisher_merge_cli_prints_stores_and_is_atomic(tmp_path: Path, pair_with_stores) -> None:  # type: ignore[no-untyped-def]
    models, stores = pair_with_stores
    recipe = write_recipe(tmp_path / "r.yml", fisher_recipe(models, stores, [1.0, 2.0]))
    out = tmp_path / "out"
    result = run_cli(
        str(BIN / "mergekit-fisher"),
        "merge",
        str(recipe),
        str(out),
        "--no-copy-tokenizer",
        "--out-shard-size",
        "30K",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for model, store in zip(models, stores):
        assert f"{model} <- {store}" in result.stderr
    assert_close(
        model_tensors(out), reference(models, stores, [1.0, 2.0], normalize=True, epsilon=1e-8)
    )
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    # A store bound to other weights fails mid-merge: the existing output stays untouched.
    bad = fisher_recipe(models, [stores[0], stores[0]], [1.0, 1.0])
    result = run_cli(
        str(BIN / "mergekit-fisher"),
        "merge",
        str(write_recipe(tmp_path / "bad.yml", bad)),
        str(out),
        "--overwrite",
    )
    assert result.returncode == 1 and "computed on other weights" in result.stderr
    assert_close(
        model_tensors(out), reference(models, stores, [1.0, 2.0], normalize=True, epsilon=1e-8)
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_autoload_costs_no_import(tmp_path: Path) -> None:
    code = "import sys; print('mergekit_fisher._hook' in sys.modules, 'torch' in sys.modules, 'mergekit' in sys.modules)"
    result = run_cli(sys.executable, "-c", code)
    assert result.stdout.split() == ["True", "False", "False"]


@requires_cuda
def test_merge_on_cuda_matches_reference(tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    merged = run_recipe(fisher_recipe(models, stores, [1.0, 3.0]), tmp_path / "out", cuda=True)
    assert_close(
        merged, reference(models, stores, [1.0, 3.0], normalize=True, epsilon=1e-8), tol=1e-5
    )


def test_lazy_unpickle_of_bin_checkpoints(tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    models = []
    for i, source in enumerate(tiny_llama_pair):
        target = tmp_path / f"bin{i}"
        target.mkdir()
        (target / "config.json").write_bytes((source / "config.json").read_bytes())
        torch.save(model_tensors(source), target / "pytorch_model.bin")
        models.append(target)
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(tiny_llama_pair)]
    merged = run_recipe(
        fisher_recipe(models, stores, [1.0, 2.0]), tmp_path / "out", lazy_unpickle=True
    )
    assert_close(
        merged, reference(list(tiny_llama_pair), stores, [1.0, 2.0], normalize=True, epsilon=1e-8)
    )


def test_kernel_is_thread_safe(kernel_path: str, tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    """--multi-gpu runs kernels concurrently in worker threads: results must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    from mergekit.merge_methods import merge_tensors

    from mergekit_fisher.methods.fisher import FISHER

    models = list(tiny_llama_pair)
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    tensors = [model_tensors(m) for m in models]
    ref = reference(models, stores, [1.0, 2.0], normalize=True, epsilon=1e-8)
    names = sorted(ref) * 4

    def merge_one(name: str) -> torch.Tensor:
        return merge_tensors(
            [t[name] for t in tensors],
            FISHER,
            ids=[str(m) for m in models],
            parameters={"fisher": [str(s) for s in stores], "weight": [1.0, 2.0]},
            name=name,
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(merge_one, names))
    for name, result in zip(names, results):
        torch.testing.assert_close(result.double(), ref[name], rtol=2e-6, atol=2e-6)


def test_a_base_store_estimated_on_an_experts_task_data_is_warned_about(
    tmp_path: Path, tiny_llama_pair, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    from mergekit_fisher import estimate_fisher
    from mergekit_fisher.preflight import _WARNED_ANCHOR

    expert, base = tiny_llama_pair
    task, general = tmp_path / "task.txt", tmp_path / "general.txt"
    task.write_text("12+34=46\n7+8=15\n")
    general.write_text("the cat sat on the mat\nrain falls in spring\n")
    common = {"max_length": 16, "batch_size": 2, "progress": False}
    stores = {
        "expert": estimate_fisher(expert, [str(task)], tmp_path / "fe", **common),
        "on task": estimate_fisher(base, [str(task)], tmp_path / "fb-task", **common),
        "general": estimate_fisher(base, [str(general)], tmp_path / "fb-general", **common),
    }
    fingerprint = "data_fingerprint"  # includes the tokenizer (model) path: never equal here
    assert (
        stores["expert"].config["estimator"][fingerprint]
        != stores["on task"].config["estimator"][fingerprint]
    )
    for anchor, warned in (("general", False), ("on task", True)):
        _WARNED_ANCHOR.clear()
        caplog.clear()
        recipe = fisher_recipe(
            [expert, base], [stores["expert"].path, stores[anchor].path], [1.0, 0.5]
        )
        recipe["base_model"] = str(base)
        with caplog.at_level("WARNING", logger="mergekit_fisher.preflight"):
            run_recipe(recipe, tmp_path / f"out-{warned}")
        lines = [r.getMessage() for r in caplog.records if "calibration data of" in r.getMessage()]
        assert len(lines) == int(warned), lines
        if warned:
            assert (
                str(stores["on task"].path) in lines[0] and str(stores["expert"].path) in lines[0]
            )
            assert "general-domain" in lines[0]
