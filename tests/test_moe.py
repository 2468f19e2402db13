"""Mixture-of-experts (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE with its shared expert): the full
Fisher of routers and fused experts against the naive batch-1 float64 loop, stores under
mergekit's fused names, and a fisher merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fisher_reference import naive_fisher, random_examples, rel_error
from test_estimate import FP32_TOL, FP64_TOL, assert_close, tiny_model
from transformers import AutoModelForCausalLM

from mergekit_fisher.estimate import EstimateConfig, EstimateError, compute_fisher, estimate_fisher
from mergekit_fisher.estimate.nodes import find_layers

torch.set_num_threads(1)

MOE = dict(
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=20,  # Qwen2-MoE: a dense MLP on flattened token rows
    experts_implementation="eager",  # grouped_mm has no float64 kernel
)
RAGGED = [9, 17, 4, 12, 2, 6]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("mode", ["empirical", "sampled"])
def test_moe_matches_naive_float64(arch: str, mode: str) -> None:
    model = tiny_model(arch, **MOE)
    examples = random_examples(RAGGED, model.config.vocab_size, seed=3, prompt=2)
    samples = 2 if mode == "sampled" else 1
    ref = naive_fisher(model, examples, mode=mode, samples=samples, seed=7)
    config = EstimateConfig(
        mode=mode,
        batch_size=4,
        samples_per_example=samples,
        seed=7,
        gradient_checkpointing=arch == "qwen3_moe",  # router/expert taps under recompute
    )
    got = compute_fisher(model, examples, config).fisher
    assert_close(got, ref, FP64_TOL)
    params = dict(model.named_parameters())
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.gate.weight"):
        assert got[name].shape == params[name].shape and bool((got[name] > 0).any())
    if arch == "qwen2_moe":  # the shared expert's rows are per token; its Fisher per example
        assert bool((got["model.layers.1.mlp.shared_expert_gate.weight"] > 0).all())


def test_qwen2_moe_skips_a_nonfinite_example() -> None:
    """--skip-nonfinite zeroes one example's rows in taps on flattened token rows too (the
    shared expert): the Fisher of the other examples, exactly."""
    model = tiny_model("qwen2_moe", **MOE)
    examples = random_examples(RAGGED, model.config.vocab_size, seed=3, prompt=2)
    others = {t for i, e in enumerate(examples) if i != 1 for t in e.input_ids}
    poison = next(t for t in examples[1].input_ids if t not in others)
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    config = EstimateConfig(mode="empirical", batch_size=4, skip_nonfinite=True)
    result = compute_fisher(model, examples, config)
    ref = naive_fisher(model, [e for i, e in enumerate(examples) if i != 1], mode="empirical")
    ref["model.embed_tokens.weight"][poison] = 0.0  # the poisoned row never enters
    assert_close(result.fisher, ref, FP64_TOL)


def test_moe_float32_grouped_mm_matches_naive() -> None:
    """transformers' default experts kernel (grouped_mm) and float32, as users run it."""
    kw = {k: v for k, v in MOE.items() if k != "experts_implementation"}
    model = tiny_model("mixtral", dtype=torch.float32, **kw)
    assert model.config._experts_implementation == "grouped_mm"
    examples = random_examples(RAGGED, model.config.vocab_size, seed=4, prompt=2)
    ref = naive_fisher(model, examples, mode="sampled", seed=1)
    got = compute_fisher(model, examples, EstimateConfig(batch_size=3, seed=1)).fisher
    assert_close(got, ref, FP32_TOL)


@pytest.mark.parametrize(
    ("arch", "mode"),
    [
        ("mixtral", "empirical"),
        ("qwen3_moe", "sampled"),
        ("qwen2_moe", "empirical"),
        ("olmoe", "sampled"),
    ],
)
def test_moe_nodes_match_explicit_masks(arch: str, mode: str) -> None:
    """One mask per expert neuron (only routed tokens reach it) and per head, against explicit
    mask tensors in a token-by-token float64 loop; mapped onto the fused weights exactly."""
    from test_nodes import assert_nodes_match_masks

    model = tiny_model(arch, **MOE)
    examples = random_examples(RAGGED, model.config.vocab_size, seed=5, prompt=2)
    result, values = assert_nodes_match_masks(model, examples, mode, seed=6)
    assert all(layer.moe is not None for layer in find_layers(model))
    p = "model.layers.1.mlp"
    neurons = values["model.layers.1.neurons"].float()
    params = dict(model.named_parameters())
    assert neurons.shape == params[f"{p}.experts.down_proj"].shape[::2]  # [E, I]
    assert bool((neurons > 0).all())  # every expert was routed some tokens
    for name, tensor in result.fisher.items():
        assert torch.broadcast_shapes(tensor.shape, params[name].shape) == params[name].shape
    gate_up, down = (result.fisher[f"{p}.experts.{w}"] for w in ("gate_up_proj", "down_proj"))
    assert down.shape == (4, 1, neurons.shape[1]) and torch.equal(down[:, 0], neurons)
    assert gate_up.shape == (4, 2 * neurons.shape[1], 1)
    assert torch.equal(gate_up[:, neurons.shape[1] :, 0], neurons)
    assert f"{p}.gate.weight" not in result.fisher  # routers: uncovered, averaged


def test_mixtral_stores_merge_through_mergekit(tmp_path: Path) -> None:
    """Stores keyed by the fused ``named_parameters()`` names line up with what mergekit merges
    (the checkpoints hold legacy per-expert keys): the merge equals the dense formula."""
    from conftest import fisher_recipe, run_recipe, save_tiny_model, stored_fisher
    from test_estimate import TEXTS, write_jsonl
    from test_methods_fisher import assert_close as assert_merged
    from test_methods_fisher import dense_reference

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    kw = {k: v for k, v in MOE.items() if k not in ("num_experts", "moe_intermediate_size")}
    models = [save_tiny_model(tmp_path / f"m{i}", arch="mixtral", seed=i, **kw) for i in (1, 2)]
    stores = [
        estimate_fisher(
            m, data, tmp_path / f"f{i}", progress=False, store_dtype="float32", dtype=dt
        ).path
        for i, (m, dt) in enumerate(zip(models, ["float64", "float32"]))  # float64: eager experts
    ]
    thetas = [
        {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(m).named_parameters()}
        for m in models
    ]
    fishers = [stored_fisher(s) for s in stores]
    assert set(fishers[0]) == set(thetas[0])
    assert fishers[0]["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 48)
    merged = run_recipe(fisher_recipe(models, stores, [1.0, 2.0], normalize=True), tmp_path / "o")
    ref = dense_reference(thetas, fishers, [1.0, 2.0], normalize=True, epsilon=1e-8)
    assert_merged(merged, ref)


def test_unknown_expert_layout_is_one_line() -> None:
    model = tiny_model("mixtral", **MOE)
    model.model.layers[1].mlp.experts.is_transposed = True
    examples = random_examples([5, 3], model.config.vocab_size)
    with pytest.raises(EstimateError, match=r"layers\.1\.mlp: .*\(transposed\).*--statistic gram"):
        compute_fisher(model, examples, EstimateConfig())


def test_mixtral_node_stores_merge_through_mergekit(tmp_path: Path) -> None:
    """Node stores of two Mixtrals: [E, 1, I] / [E, 2I, 1] broadcast onto the fused experts in
    mergekit's fisher merge (the dense formula), routers and norms averaged."""
    from conftest import fisher_recipe, run_recipe, save_tiny_model, stored_fisher
    from test_estimate import TEXTS, write_jsonl
    from test_methods_fisher import assert_close as assert_merged
    from test_methods_fisher import dense_reference

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    kw = {k: v for k, v in MOE.items() if k not in ("num_experts", "moe_intermediate_size")}
    models = [save_tiny_model(tmp_path / f"m{i}", arch="mixtral", seed=i, **kw) for i in (1, 2)]
    stores = [
        estimate_fisher(m, data, tmp_path / f"f{i}", granularity="nodes", progress=False)
        for i, m in enumerate(models)
    ]
    assert all(s.averages_uncovered for s in stores)
    thetas = [
        {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(m).named_parameters()}
        for m in models
    ]
    fishers = [stored_fisher(s.path) for s in stores]
    assert fishers[0]["model.layers.0.mlp.experts.down_proj"].shape == (4, 1, 48)
    recipe = fisher_recipe(
        models, [s.path for s in stores], [1.0, 1.0], normalize=False, epsilon=0.0
    )
    merged = run_recipe(recipe, tmp_path / "o")
    ones = [
        {n: fisher.get(n, torch.ones(())) for n in theta} for fisher, theta in zip(fishers, thetas)
    ]
    ref = dense_reference(thetas, ones, [1.0, 1.0], normalize=False, epsilon=0.0)
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert_merged({name: merged[name]}, {name: ref[name]})
    router = "model.layers.1.mlp.gate.weight"  # uncovered: the average
    assert torch.allclose(merged[router], (thetas[0][router] + thetas[1][router]) / 2, atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_nodes_under_checkpointing_and_grouped_mm(arch: str) -> None:
    """Expert-neuron masks are tapped the same way under gradient checkpointing (recomputed
    forwards) and with transformers' default grouped_mm experts in float32, as users run it."""
    kw = {k: v for k, v in MOE.items() if k != "experts_implementation"}
    examples = random_examples(RAGGED, tiny_model(arch, **MOE).config.vocab_size, seed=9, prompt=2)
    config = EstimateConfig(granularity="nodes", batch_size=4, seed=2)
    plain = compute_fisher(tiny_model(arch, **MOE), examples, config).fisher
    ckpt = compute_fisher(
        tiny_model(arch, **MOE), examples, config.with_(gradient_checkpointing=True)
    ).fisher
    grouped = tiny_model(arch, dtype=torch.float32, **kw)
    assert grouped.config._experts_implementation == "grouped_mm"
    eager = tiny_model(arch, dtype=torch.float32, **MOE)
    fast, slow = (compute_fisher(m, examples, config).fisher for m in (grouped, eager))
    assert set(ckpt) == set(plain) == set(fast) == set(slow)
    for name in plain:
        assert rel_error(ckpt[name], plain[name]) <= 1e-10, name
        assert rel_error(fast[name], slow[name]) <= 1e-4, name
