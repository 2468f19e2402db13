"""`fisher_arithmetic` through mergekit's real pipeline, against a dense float64 reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_store, model_tensors, run_recipe, save_tiny_model, stored_fisher

pytestmark = pytest.mark.usefixtures("fresh_cache")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A base and three experts of it (small random task vectors, as fine-tunes are)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("family")
    base = save_tiny_model(root / "base", seed=7)
    experts = []
    for i in range(3):
        out = save_tiny_model(root / f"expert{i}", seed=7)
        g = torch.Generator().manual_seed(100 + i)
        tensors = {
            n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in model_tensors(out).items()
        }
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        experts.append(out)
    return base, experts


def recipe(base: Path, experts: list[Path], stores: list[Path], **params: Any) -> dict[str, Any]:
    weights = params.pop("weights", [1.0] * len(experts))
    return {
        "merge_method": "fisher_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": w, "fisher": str(s)}}
            for m, s, w in zip(experts, stores, weights)
        ],
        "parameters": params,
        "dtype": "float32",
    }


def reference(
    base: Path,
    experts: list[Path],
    stores: list[Path],
    weights: list[float],
    gamma: float,
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """theta_b + sum_m w_m c_m tau_m, with c_m = min(1, (1 + gamma (M-1)) F_m /
    (F_m + gamma sum_{k != m} F_k)) written per expert in float64; c_m = 1 where F is all zero."""
    import json

    theta_b = {n: t.double() for n, t in model_tensors(base).items()}
    thetas = [{n: t.double() for n, t in model_tensors(e).items()} for e in experts]
    fishers = [stored_fisher(s) for s in stores]
    norms = [
        json.loads((s / "fisher_config.json").read_text())["statistics"]["global_l2_norm"]
        if normalize
        else 1.0
        for s in stores
    ]
    m = len(experts)
    out = {}
    for name, b in theta_b.items():
        if any(name not in fisher for fisher in fishers):  # uncovered by node stores
            out[name] = b + sum(w * (t[name] - b) for w, t in zip(weights, thetas))
            continue
        f = [fisher[name].double().expand_as(b) / norm for fisher, norm in zip(fishers, norms)]
        merged = b.clone()
        for i in range(m):
            others = sum(f[k] for k in range(m) if k != i)
            denominator = f[i] + gamma * others
            c = torch.where(
                denominator > 0,
                ((1 + gamma * (m - 1)) * f[i] / denominator).clamp(max=1.0),
                torch.ones_like(b),
            )
            merged += weights[i] * c * (thetas[i][name] - b)
        out[name] = merged
    return out


def _stores(experts: list[Path], root: Path, **kwargs: Any) -> list[Path]:
    return [make_store(e, root / f"f{i}", seed=i, **kwargs) for i, e in enumerate(experts)]


@pytest.mark.parametrize("gamma", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("count", [2, 3])
def test_matches_dense_reference(
    tmp_path: Path, family, count: int, gamma: float, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    base, experts = family[0], family[1][:count]
    stores = _stores(experts, tmp_path)
    weights = [1.0, 0.5, 2.0][:count]
    expected = reference(base, experts, stores, weights, gamma)
    merged = run_recipe(recipe(base, experts, stores, gamma=gamma, weights=weights), tmp_path / "o")
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-5, atol=1e-6)


def test_rows_path_and_unnormalized(
    tmp_path: Path, family, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A block of rows at a time (a chunk so small that tiny tensors span many blocks)."""
    from mergekit_fisher.methods import common

    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 37)
    base, experts = family[0], family[1][:2]
    stores = _stores(experts, tmp_path)
    expected = reference(base, experts, stores, [1.0, 1.0], 0.3, normalize=False)
    merged = run_recipe(recipe(base, experts, stores, gamma=0.3, normalize=False), tmp_path / "o")
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-5, atol=1e-6)


def test_gamma_zero_is_mergekit_task_arithmetic(tmp_path: Path, family) -> None:  # type: ignore[no-untyped-def]
    base, experts = family[0], family[1]
    stores = _stores(experts, tmp_path)
    ours = run_recipe(recipe(base, experts, stores, gamma=0.0), tmp_path / "ours")
    theirs = run_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
            "dtype": "float32",
        },
        tmp_path / "ta",
    )
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-7)


def test_node_stores_broadcast_and_uncovered_weights_get_task_arithmetic(
    tmp_path: Path, family
) -> None:  # type: ignore[no-untyped-def]
    base, experts = family[0], family[1][:2]
    names = sorted(model_tensors(base))
    rows = tuple(n for n in names if n.endswith("q_proj.weight"))
    dropped = tuple(n for n in names if "norm" in n or "embed" in n)
    stores = _stores(experts, tmp_path, broadcast=rows, drop=dropped, granularity="nodes")
    merged = run_recipe(recipe(base, experts, stores, gamma=0.5), tmp_path / "o")
    expected = reference(base, experts, stores, [1.0, 1.0], 0.5)
    assert set(expected) == set(names) and any(n in dropped for n in expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-5, atol=1e-6)


def test_base_needs_no_store_but_experts_do(tmp_path: Path, family) -> None:  # type: ignore[no-untyped-def]
    from mergekit_fisher.errors import FisherError

    base, experts = family[0], family[1][:2]
    stores = _stores(experts, tmp_path)
    config = recipe(base, experts, stores)
    del config["models"][1]["parameters"]["fisher"]
    with pytest.raises(FisherError, match="has no `fisher` parameter"):
        run_recipe(config, tmp_path / "o")


@pytest.mark.parametrize("method", ["fisher_ties", "fisher_arithmetic", "task_arithmetic"])
def test_a_missing_base_model_is_one_line(tmp_path: Path, family, method: str) -> None:  # type: ignore[no-untyped-def]
    """Every method that needs a base (ours and mergekit's) says to add it, before any load."""
    from mergekit_fisher.cli import main

    base, experts = family[0], family[1][:2]
    config = recipe(base, experts, _stores(experts, tmp_path)) | {"merge_method": method}
    del config["base_model"]
    config["models"] = [m for m in config["models"] if m["model"] != str(base)]
    if method == "task_arithmetic":
        for model in config["models"]:
            model["parameters"] = {"weight": 1.0}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert f"merge_method {method} needs a base model: add `base_model:" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ fisher_ties


def ties_reference(
    base: Path,
    experts: list[Path],
    stores: list[Path],
    weights: list[float],
    density: float,
    normalize: bool,
) -> dict[str, torch.Tensor]:
    """Fisher-TIES written out per element in float64: importance F tau^2 trimmed to the top
    ``density`` share (by sorting), the sign of the Fisher-weighted pull, agreeing ones summed."""
    import json

    theta_b = {n: t.double() for n, t in model_tensors(base).items()}
    thetas = [{n: t.double() for n, t in model_tensors(e).items()} for e in experts]
    fishers = [stored_fisher(s) for s in stores]
    norms = [
        json.loads((s / "fisher_config.json").read_text())["statistics"]["global_l2_norm"]
        for s in stores
    ]
    out = {}
    for name, b in theta_b.items():
        taus = [t[name] - b for t in thetas]
        fs = [
            f[name].double().expand_as(b) / (n if normalize else 1.0)
            for f, n in zip(fishers, norms)
        ]
        keeps = []
        for f, tau in zip(fs, taus):
            importance = (f * tau**2).reshape(-1)
            k = round(density * importance.numel())
            order = importance.argsort(descending=True)
            keep = torch.zeros_like(importance, dtype=torch.bool)
            keep[order[:k]] = True
            keep |= importance >= importance[order[k - 1]]  # ties at the threshold stay
            keeps.append(keep.reshape(b.shape))
        pull = sum(w * torch.where(k, f * t, 0.0) for w, k, f, t in zip(weights, keeps, fs, taus))
        sign = torch.where(pull >= 0, 1.0, -1.0).double()
        merged = b.clone()
        for w, k, t in zip(weights, keeps, taus):
            merged += w * torch.where(k & (t.sign() == sign), t, 0.0)
        out[name] = merged
    return out


@pytest.mark.parametrize(
    ("count", "density", "normalize"),
    [(2, 1.0, None), (3, 1.0, None), (2, 0.4, None), (3, 0.4, True), (2, 1.0, True)],
)
def test_fisher_ties_matches_dense_reference(
    tmp_path: Path, family, count: int, density: float, normalize: bool | None
) -> None:  # type: ignore[no-untyped-def]
    """``normalize: None`` leaves it out of the recipe: the default is the unscaled Fisher."""
    base, experts = family[0], family[1][:count]
    stores = _stores(experts, tmp_path, zero_fraction=0.0)
    weights = [1.0, 0.5, 2.0][:count]
    config = recipe(base, experts, stores, weights=weights)
    config["merge_method"] = "fisher_ties"
    if normalize is not None:
        config["parameters"] = {"normalize": normalize}
    for model in config["models"]:
        model["parameters"]["density"] = density
    merged = run_recipe(config, tmp_path / "o")
    expected = ties_reference(base, experts, stores, weights, density, bool(normalize))
    changed = 0
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-5, atol=1e-6)
        ta = model_tensors(base)[name].double() + sum(
            w * (model_tensors(e)[name].double() - model_tensors(base)[name].double())
            for w, e in zip(weights, experts)
        )
        changed += int(not torch.allclose(value, ta))
    assert changed > 0  # collisions were resolved somewhere: not task arithmetic
    other = ties_reference(base, experts, stores, weights, density, not normalize)
    assert any(not torch.allclose(merged[n].double(), v) for n, v in other.items())
