"""RegMean++ (``regmean-plus``): every Gram against a dense float64 reference that rebuilds the
whole model for each layer, the final merge through mergekit, the plain-Gram limit, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import model_tensors, run_recipe, save_tiny_model

from mergekit_fisher.cli import main
from mergekit_fisher.estimate import EstimateConfig, EstimateError, estimate_fisher
from mergekit_fisher.estimate.regmean_plus import assign_data, read_recipe, regmean_plus
from mergekit_fisher.store import open_store

TEXTS = [
    ["12+34=46", "abc def ghi jkl", "hello 77 and more words", "x"],
    ["zz+1=zz1 and more", "merge me 5", "qq rr ss tt uu vv"],
    ["9*9=81 is it?", "the quick brown fox", "a b c d e f g h"],
]
LAYERS = 2


pytestmark = pytest.mark.usefixtures("fresh_cache")


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """Three tiny Llamas and one calibration file each."""
    root = tmp_path_factory.mktemp("plus")
    models = [save_tiny_model(root / f"m{i}", seed=10 + i) for i in range(3)]
    data = []
    for i, texts in enumerate(TEXTS):
        (root / f"d{i}.txt").write_text("\n".join(texts))
        data.append(root / f"d{i}.txt")
    return models, data


# --------------------------------------------------------------------------- dense reference


def block_of(name: str) -> int | None:
    """The decoder layer of a weight name; LAYERS for the head (final norm, lm_head)."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return None if "embed_tokens" in name else LAYERS


def naive_grams(
    model_dir: Path, state: dict[str, torch.Tensor], texts: list[str], block: int
) -> dict[str, torch.Tensor]:
    """The full model holding ``state`` in float64, batch 1: X^T X / N at the inputs of the
    linear layers of ``block`` (LAYERS: lm_head), by weight name."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).double()
    model.load_state_dict(state, strict=True)
    model.eval()
    rows: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and block_of(f"{name}.weight") == block:

            def record(m, inputs, name=name):  # type: ignore[no-untyped-def]
                rows.setdefault(f"{name}.weight", []).append(inputs[0][0])

            handles.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        for text in texts:
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    for handle in handles:
        handle.remove()
    grams = {}
    for name, parts in rows.items():
        x = torch.cat(parts)
        grams[name] = x.T @ x / x.shape[0]
    return grams


def dense_merge(
    tensors: list[torch.Tensor],
    grams: list[torch.Tensor] | None,
    weights: list[float],
    alpha: float,
) -> torch.Tensor:
    """RegMean written out: (sum w W G~)(sum w G~)^-1 for a linear, the weighted mean else."""
    if grams is None:
        return sum(w * t for w, t in zip(weights, tensors)) / sum(weights)
    reg = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    total = sum(w * g for w, g in zip(weights, reg))
    rhs = sum(w * t @ g for w, t, g in zip(weights, tensors, reg))
    return torch.linalg.solve(total, rhs.T).T  # total is symmetric


def regmean_plus_reference(
    models: list[Path], weights: list[float], alpha: float
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Each model's Grams and the merged weights, block by block: block l's Grams of model m
    come from the full model with the merged embedding and blocks < l, model m's own rest."""
    thetas = [{n: t.double() for n, t in model_tensors(m).items()} for m in models]
    merged: dict[str, torch.Tensor] = {}
    grams: list[dict[str, torch.Tensor]] = [{} for _ in models]
    for block in [None, *range(LAYERS + 1)]:
        if block is not None:
            for m, theta in enumerate(thetas):
                grams[m].update(naive_grams(models[m], {**theta, **merged}, TEXTS[m], block))
        for name in (n for n in thetas[0] if block_of(n) == block):
            per_model = [g.get(name) for g in grams]
            covered = None if any(g is None for g in per_model) else per_model
            merged[name] = dense_merge([t[name] for t in thetas], covered, weights, alpha)
    return grams, merged


def test_every_gram_and_the_merge_match_the_dense_reference(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    models, data = trio
    weights, alpha = [1.0, 2.0, 0.5], 0.7
    recipe = {
        "merge_method": "regmean",
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
        "parameters": {"alpha": alpha},
        "dtype": "float32",
    }
    config = EstimateConfig(device="cpu", batch_size=2, progress=False)
    result = regmean_plus(recipe, [[str(d)] for d in data], tmp_path / "plus", config)
    ref_grams, ref_merged = regmean_plus_reference(models, weights, alpha)
    for store_dir, ref in zip(result.stores, ref_grams):
        store = open_store(store_dir)
        consumers = store.config["consumers"]
        assert set(consumers) == set(ref)
        for weight, key in consumers.items():
            torch.testing.assert_close(
                store.get(key, dtype=torch.float64), ref[weight], rtol=1e-4, atol=1e-6, msg=weight
            )
    plain = naive_grams(models[0], model_tensors(models[0]), TEXTS[0], 1)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(plain[name], ref_grams[0][name], rtol=1e-2)  # not plain RegMean
    merged = run_recipe(yaml.safe_load(result.recipe.read_text()), tmp_path / "merged")
    assert set(merged) == set(ref_merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(
            tensor.double(), ref_merged[name], rtol=1e-4, atol=1e-5, msg=name
        )


VARIANTS = {
    "llama": {},
    "tied": {"tie_word_embeddings": True},
    # layer 1 attends through a 3-token window: its mask is not layer 0's
    "qwen2-sliding": {
        "arch": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 3,
        "max_window_layers": 1,
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_identical_experts_give_the_plain_gram_stores(tmp_path: Path, trio, variant: str) -> None:  # type: ignore[no-untyped-def]
    """Merging copies of one model changes nothing, so each input's block inputs are its own:
    RegMean++ must reproduce `estimate --statistic gram` on the same data (a tied lm_head: no
    Gram, as there; sliding-window layers: each layer's own mask)."""
    _, data = trio
    model = save_tiny_model(tmp_path / variant, seed=7, **VARIANTS[variant])
    twin = shutil.copytree(model, tmp_path / "twin")
    recipe = {"models": [{"model": str(model)}, {"model": str(twin)}]}
    config = EstimateConfig(device="cpu", batch_size=2, progress=False)
    result = regmean_plus(recipe, [[str(data[0])], [str(data[1])]], tmp_path / "plus", config)
    for i, (path, store_dir) in enumerate(zip([model, twin], result.stores)):
        plain = estimate_fisher(path, [data[i]], tmp_path / f"plain{i}", config, statistic="gram")
        plus = open_store(store_dir)
        assert plain is not None and plus.config["consumers"] == plain.config["consumers"]
        assert plus.config["binding"] == plain.config["binding"]
        assert plus.config["estimator"]["num_tokens"] == plain.config["estimator"]["num_tokens"]
        for key in plain.names:
            torch.testing.assert_close(plus.get(key), plain.get(key), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- recipe and data


def test_recipe_inputs_weights_and_base_model() -> None:
    plus = read_recipe(
        {
            "merge_method": "regmean",
            "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 2}}, {"model": "b"}],
            "parameters": {"weight": 0.5, "alpha": 0.8},
        }
    )
    assert plus.models == ("a", "b", "base") and plus.weights == (2.0, 0.5, 0.5)
    assert plus.alpha == 0.8
    assert assign_data(plus, ["0=x.txt", "b=y.txt", "2=z.txt", "0=w.txt"]) == [
        ("x.txt", "w.txt"),
        ("y.txt",),
        ("z.txt",),
    ]


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"merge_method": "fisher", "models": [{"model": "a"}]}, "merge_method 'fisher'"),
        ({"models": [{"model": "a", "parameters": {"weight": [0, 1]}}]}, "one number"),
        ({"models": [{"model": "a", "parameters": {"density": 1}}]}, "unknown parameter"),
        ({"models": [{"model": "a"}], "parameters": {"alpha": 2}}, "alpha is 2"),
        ({"models": [{"model": "a"}, {"model": "a"}]}, "distinct models"),
        ({"slices": []}, "models"),
    ],
)
def test_bad_recipes_are_refused(recipe: dict, message: str) -> None:
    with pytest.raises(EstimateError, match=message):
        read_recipe(recipe)


def test_data_must_name_an_input_and_cover_every_one() -> None:
    plus = read_recipe({"models": [{"model": "a"}, {"model": "b"}]})
    with pytest.raises(EstimateError, match="'c' is not an input"):
        assign_data(plus, ["c=x.txt"])
    with pytest.raises(EstimateError, match="MODEL_OR_INDEX=FILE"):
        assign_data(plus, ["x.txt"])
    with pytest.raises(EstimateError, match="no --data for b"):
        assign_data(plus, ["a=x.txt"])


# --------------------------------------------------------------------------- command line


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: ")
    return result.output


def test_cli_help_names_the_data_format() -> None:
    result = CliRunner().invoke(main, ["regmean-plus", "--help"])
    assert result.exit_code == 0 and "MODEL_OR_INDEX=FILE" in result.output
    assert "valid" in result.output and "recipe" in result.output


def test_cli_bad_recipe_and_missing_data_are_one_line(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    models, data = trio
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"merge_method": "ties", "models": [{"model": str(models[0])}]}))
    args = ["--out", str(tmp_path / "o"), "--device", "cpu"]
    result = CliRunner().invoke(main, ["regmean-plus", str(bad), "--data", f"0={data[0]}", *args])
    assert "merge_method 'ties'" in one_line_error(result)
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump({"models": [{"model": str(m)} for m in models[:2]]}))
    result = CliRunner().invoke(main, ["regmean-plus", str(good), "--data", f"0={data[0]}", *args])
    assert "no --data for" in one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_cli_end_to_end_through_mergekit_yaml(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    models, data = trio
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "regmean",
                "base_model": str(models[2]),
                "models": [{"model": str(m)} for m in models[:2]],
                "dtype": "float32",
            }
        )
    )
    out = tmp_path / "plus"
    data_args = [
        "--data",
        f"{models[0]}={data[0]}",
        "--data",
        f"1={data[1]}",
        "--data",
        f"2={data[2]}",
    ]
    result = CliRunner().invoke(
        main,
        [
            "regmean-plus",
            str(recipe),
            *data_args,
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "recipe.yml").read_text())
    assert [m["model"] for m in written["models"]] == [str(m) for m in models]  # base listed
    assert [Path(m["parameters"]["gram"]).name for m in written["models"]] == [
        "m0-gram",
        "m1-gram",
        "m2-gram",
    ]
    shown = CliRunner().invoke(main, ["inspect", str(out / "m1-gram")])
    assert shown.exit_code == 0 and "regmean_plus" in shown.output, shown.output
    merged = CliRunner().invoke(
        mergekit_yaml, [str(out / "recipe.yml"), str(tmp_path / "merged"), "--no-copy-tokenizer"]
    )
    assert merged.exit_code == 0, merged.output
    tensors = model_tensors(tmp_path / "merged")
    assert set(tensors) == set(model_tensors(models[0]))
    assert all(torch.isfinite(t).all() for t in tensors.values())
