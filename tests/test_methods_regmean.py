"""The `regmean` merge method through mergekit, against a dense float64 reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fisher_recipe, make_store, model_tensors, run_recipe, stored_fisher

from mergekit_fisher.store import StoreError, write_store

pytestmark = pytest.mark.usefixtures("fresh_cache")


def input_key(name: str) -> str:
    """Llama projections that read the same input share one Gram."""
    for group, members in (
        ("qkv", ("q_proj", "k_proj", "v_proj")),
        ("gate_up", ("gate_proj", "up_proj")),
    ):
        for member in members:
            if f".{member}." in name:
                return name.replace(member, group).removesuffix(".weight") + ".input"
    return name.removesuffix(".weight") + ".input"


def make_gram_store(
    model: Path,
    out: Path,
    seed: int,
    dead_input: bool = False,
    store_dtype: torch.dtype = torch.float32,
) -> Path:
    weights = model_tensors(model)
    g = torch.Generator().manual_seed(seed)
    grams: dict[str, torch.Tensor] = {}
    consumers = {}
    for name, w in weights.items():
        if w.ndim != 2 or "embed" in name:
            continue
        key = input_key(name)
        if key not in grams:
            x = torch.randn(w.shape[1], 3 * w.shape[1], generator=g)
            if dead_input:
                x[0] = 0.0
            grams[key] = x @ x.T / x.shape[1]
        consumers[name] = key
    write_store(
        out,
        grams,
        weights={n: weights[n] for n in consumers},
        statistic="gram",
        consumers=consumers,
        store_dtype=store_dtype,
    )
    return out


def regmean_reference(
    models: list[Path], stores: list[Path], weights: list[float], alpha: float
) -> dict[str, torch.Tensor]:
    thetas = [model_tensors(m) for m in models]
    grams = [stored_fisher(s) for s in stores]
    out = {}
    for name in thetas[0]:
        if name.endswith("embed_tokens.weight") or thetas[0][name].ndim != 2:
            out[name] = sum(w * t[name].double() for w, t in zip(weights, thetas)) / sum(weights)
            continue
        total = 0
        rhs = 0
        for w, t, gs in zip(weights, thetas, grams):
            g = gs[input_key(name)].double()
            g = alpha * g + (1 - alpha) * torch.diag(torch.diag(g))
            total = total + w * g
            rhs = rhs + w * t[name].double() @ g
        out[name] = rhs @ torch.linalg.inv(total)
    return out


def regmean_recipe(
    models: list[Path], stores: list[Path], weights: list[float], **params: object
) -> dict:
    return {
        "merge_method": "regmean",
        "models": [
            {"model": str(m), "parameters": {"weight": w, "gram": str(s)}}
            for m, s, w in zip(models, stores, weights)
        ],
        "parameters": params,
        "dtype": "float32",
    }


@pytest.mark.parametrize(
    ("weights", "alpha"), [([1.0, 1.0], 0.9), ([1.0, 2.0], 0.5), ([1.0, 1.0], 1.0)]
)
def test_regmean_matches_dense_reference(
    tmp_path: Path, tiny_llama_pair, weights: list[float], alpha: float
) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    stores = [make_gram_store(m, tmp_path / f"g{i}", seed=i) for i, m in enumerate(models)]
    merged = run_recipe(regmean_recipe(models, stores, weights, alpha=alpha), tmp_path / "out")
    ref = regmean_reference(models, stores, weights, alpha)
    assert set(merged) == set(ref)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.double(), ref[name], rtol=1e-5, atol=1e-5, msg=name)
    # The reference is not a plain average: RegMean must move the linear weights.
    a, b = (model_tensors(m)["model.layers.0.self_attn.q_proj.weight"] for m in models)
    assert not torch.allclose(
        merged["model.layers.0.self_attn.q_proj.weight"],
        (a * weights[0] + b * weights[1]) / sum(weights),
        atol=1e-3,
    )


def test_regmean_with_a_dead_input_still_solves(tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    stores = [
        make_gram_store(m, tmp_path / f"g{i}", seed=i, dead_input=True)
        for i, m in enumerate(models)
    ]
    merged = run_recipe(regmean_recipe(models, stores, [1.0, 1.0], alpha=1.0), tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_bfloat16_gram_stores_are_merged_with_a_warning(
    tmp_path: Path, tiny_llama_pair, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    stores = [
        make_gram_store(
            m, tmp_path / f"g{i}", seed=i, store_dtype=torch.bfloat16 if i else torch.float32
        )
        for i, m in enumerate(models)
    ]
    with caplog.at_level("WARNING"):
        merged = run_recipe(regmean_recipe(models, stores, [1.0, 1.0]), tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if "stored in bfloat16" in r.getMessage()]
    assert len(warnings) == 1 and str(stores[1]) in warnings[0], warnings
    ref = regmean_reference(models, stores, [1.0, 1.0], alpha=0.9)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.double(), ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_fisher_and_regmean_refuse_each_others_stores(tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    grams = [make_gram_store(m, tmp_path / f"g{i}", seed=i) for i, m in enumerate(models)]
    fishers = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    with pytest.raises(StoreError, match="needs a fisher store"):
        run_recipe(fisher_recipe(models, grams, [1.0, 1.0]), tmp_path / "o1")
    with pytest.raises(StoreError, match="needs a gram store"):
        run_recipe(regmean_recipe(models, fishers, [1.0, 1.0]), tmp_path / "o2")


def test_regmean_factorizes_each_shared_input_once(
    tmp_path: Path, tiny_llama_pair, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """q/k/v (and gate/up) reuse one cached factorization; the cache is empty afterwards."""
    from mergekit_fisher.methods import regmean

    models = list(tiny_llama_pair)
    stores = [make_gram_store(m, tmp_path / f"g{i}", seed=i) for i, m in enumerate(models)]
    prepared: list[str] = []
    real_prepare = regmean._prepare

    def counting_prepare(entry, stores, located, *args):  # type: ignore[no-untyped-def]
        prepared.append(located[0])
        return real_prepare(entry, stores, located, *args)

    monkeypatch.setattr(regmean, "_prepare", counting_prepare)
    regmean.clear_factor_cache()
    merged = run_recipe(regmean_recipe(models, stores, [1.0, 3.0], alpha=0.7), tmp_path / "out")
    assert regmean.cached_inputs() == 0
    assert len(prepared) == len(set(prepared))  # one factorization per distinct input
    assert "model.layers.0.self_attn.qkv.input" in prepared
    ref = regmean_reference(models, stores, [1.0, 3.0], 0.7)
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        torch.testing.assert_close(merged[name].double(), ref[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", ["methods.regmean", "methods.fisher", "methods.common"])
def test_any_methods_module_imported_first_registers_all(first: str) -> None:
    import os
    import subprocess
    import sys

    code = (
        f"import mergekit_fisher.{first}, mergekit.merge_methods as m; "
        "print(sorted({x.spec.name for x in m.registered_methods()} & {'fisher', 'regmean'}))"
    )
    env = {**os.environ, "MERGEKIT_FISHER_AUTOLOAD": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "['fisher', 'regmean']"
