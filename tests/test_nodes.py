"""Mask-node Fisher (--granularity nodes): exact against explicit masks, GQA, mapping, merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import fisher_recipe, model_tensors, run_recipe, save_tiny_model, tiny_config
from fisher_reference import naive_node_fisher, random_examples, rel_error
from transformers import AutoModelForCausalLM

from mergekit_fisher.estimate import EstimateConfig, EstimateError, compute_fisher, estimate_fisher
from mergekit_fisher.estimate.nodes import find_layers

torch.set_num_threads(1)

TOL = 1e-6
LENGTHS = [9, 17, 4, 12, 17, 6]


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float64, **kw):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).to(dtype).eval()
    return model.requires_grad_(False)


@pytest.mark.parametrize(
    ("arch", "mode", "kv"),
    [
        ("llama", "empirical", 2),
        ("llama", "sampled", 2),
        ("qwen2", "sampled", 1),
        ("llama", "empirical", 4),
        ("phi3", "sampled", 2),  # fused qkv_proj and gate_up_proj
        ("starcoder2", "empirical", 2),  # MLP c_fc / c_proj, biases
        ("gpt2", "empirical", 4),  # Conv1D c_attn / c_proj ([in, out] weights)
        ("phi", "sampled", 2),  # Phi-1/2: attention output `dense`, MLP fc1 / fc2
        ("apertus", "empirical", 2),  # MLP up_proj / down_proj, no gate
    ],
)
def test_node_values_match_explicit_masks(arch: str, mode: str, kv: int) -> None:
    model = tiny_model(arch, num_key_value_heads=kv)
    examples = random_examples(LENGTHS, model.config.vocab_size, seed=2, prompt=3)
    assert_nodes_match_masks(model, examples, mode, seed=4)
    assert not any(p.requires_grad for p in model.parameters())


def assert_nodes_match_masks(
    model: torch.nn.Module, examples: list, mode: str, seed: int
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Estimate nodes (batches of 4, two draws when sampled) and check every layer's head,
    neuron and kv values against explicit masks; returns the result and its node values."""
    samples = 2 if mode == "sampled" else 1
    ref = naive_node_fisher(model, examples, mode=mode, samples=samples, seed=seed)
    config = EstimateConfig(
        mode=mode, granularity="nodes", batch_size=4, samples_per_example=samples, seed=seed
    )
    result = compute_fisher(model, examples, config)
    values = result.collector.node_values(len(examples) * samples)
    for layer in find_layers(model):
        p = layer.prefix
        assert rel_error(values[f"{p}.heads"], ref[f"{p}.heads"]) <= TOL
        assert rel_error(values[f"{p}.neurons"], ref[f"{p}.neurons"]) <= TOL
        # GQA: the kv value is exactly the Fisher of a mask on that kv head's values.
        assert rel_error(values[f"{p}.kv"], ref[f"{p}.vmask"]) <= TOL
    return result, values


def test_mapping_broadcasts_onto_the_gated_weights() -> None:
    model = tiny_model("qwen2")  # 4 query heads, 2 kv heads, q/k/v biases
    examples = random_examples(LENGTHS, model.config.vocab_size, seed=3)
    base = EstimateConfig(granularity="nodes", mode="empirical", batch_size=3)
    result = compute_fisher(model, examples, base)
    values = result.collector.node_values(len(examples))
    fisher = result.fisher
    weights = dict(model.named_parameters())
    p = "model.layers.0"
    d = model.config.hidden_size // model.config.num_attention_heads
    heads, kv, neurons = values[f"{p}.heads"], values[f"{p}.kv"], values[f"{p}.neurons"]
    for name, tensor in fisher.items():
        assert torch.broadcast_shapes(tensor.shape, weights[name].shape) == weights[name].shape
    q = fisher[f"{p}.self_attn.q_proj.weight"]
    assert q.shape == (4 * d, 1) and torch.allclose(q[d * 2 : d * 3, 0], heads[2].float())
    assert torch.allclose(fisher[f"{p}.self_attn.q_proj.bias"], q[:, 0])
    o = fisher[f"{p}.self_attn.o_proj.weight"]
    assert o.shape == (1, 4 * d) and torch.allclose(o[0, d : 2 * d], heads[1].float())
    k = fisher[f"{p}.self_attn.k_proj.weight"]
    assert k.shape == (2 * d, 1) and torch.allclose(k[d:, 0], kv[1].float())
    assert torch.allclose(fisher[f"{p}.mlp.down_proj.weight"][0], neurons.float())
    assert torch.allclose(fisher[f"{p}.mlp.up_proj.weight"][:, 0], neurons.float())
    uncovered = {n for n in weights if "norm" in n or "embed" in n or "lm_head" in n}
    assert not uncovered & set(fisher)
    # kv_heads="sum": k/v rows of kv head g get the sum of its query heads' values.
    summed = compute_fisher(model, examples, base.with_(kv_heads="sum")).fisher
    v = summed[f"{p}.self_attn.v_proj.weight"]
    assert torch.allclose(v[:d, 0], heads[:2].sum().float().expand(d))
    # node_mapping="paper": v and o_proj get one layer mean.
    paper = compute_fisher(model, examples, base.with_(node_mapping="paper")).fisher
    assert paper[f"{p}.self_attn.o_proj.weight"].shape == (1, 1)
    assert torch.allclose(paper[f"{p}.self_attn.v_proj.weight"], heads.mean().float())


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "gemma2", "gemma3_text"])
def test_supported_layouts_are_found(arch: str) -> None:
    model = tiny_model(arch, dtype=torch.float32)
    layers = find_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    examples = random_examples([6, 9], model.config.vocab_size)
    fisher = compute_fisher(model, examples, EstimateConfig(granularity="nodes")).fisher
    assert len(fisher) >= 7 * len(layers) and all(torch.isfinite(t).all() for t in fisher.values())


def test_unsupported_layout_names_the_module() -> None:
    model = tiny_model("gpt_neox", dtype=torch.float32)
    with pytest.raises(EstimateError, match=r"module 'gpt_neox.layers.0' \(GPTNeoXLayer\)"):
        find_layers(model)


def test_node_store_is_small_and_merges_through_mergekit(
    tiny_llama_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    data = tmp_path / "d.jsonl"
    texts = ["the quick brown fox", "1 + 2 = 3", "hello world, how are you?", "abc def ghi"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stores = []
    for i, model in enumerate(tiny_llama_pair):
        store = estimate_fisher(
            model, data, tmp_path / f"f{i}", granularity="nodes", progress=False, seed=i
        )
        assert store.granularity == "nodes" and store.averages_uncovered
        assert store.config["estimator"]["node_mapping"] == "heads"
        stores.append(store)
    full = estimate_fisher(tiny_llama_pair[0], data, tmp_path / "full", progress=False)
    size = lambda s: sum(f.stat().st_size for f in Path(s.path).glob("*.safetensors"))  # noqa: E731
    assert size(stores[0]) * 5 < size(full)

    merged = run_recipe(
        fisher_recipe(
            list(tiny_llama_pair),
            [s.path for s in stores],
            [1.0, 1.0],
            normalize=False,
            epsilon=0.0,
        ),
        tmp_path / "merged",
    )
    a, b = (model_tensors(m) for m in tiny_llama_pair)
    name = "model.layers.1.self_attn.q_proj.weight"
    fa, fb = (s.get(name) for s in stores)
    expected = (fa * a[name] + fb * b[name]) / (fa + fb)
    assert torch.allclose(merged[name], expected, atol=1e-6)
    norm = "model.layers.0.input_layernorm.weight"  # uncovered: the weighted average
    assert torch.allclose(merged[norm], (a[norm] + b[norm]) / 2, atol=1e-6)


def test_nodes_with_gradient_checkpointing_match(tmp_path: Path) -> None:
    model = tiny_model("llama")
    examples = random_examples(LENGTHS, model.config.vocab_size, seed=8)
    config = EstimateConfig(granularity="nodes", batch_size=3)
    plain = compute_fisher(model, examples, config).fisher
    ckpt = compute_fisher(
        tiny_model("llama"), examples, config.with_(gradient_checkpointing=True)
    ).fisher
    for name in plain:
        assert rel_error(ckpt[name], plain[name]) <= 1e-10


def test_save_tiny_model_roundtrip_for_nodes(tmp_path: Path) -> None:
    """A saved Gemma-2-shaped checkpoint estimates through the public API (bf16 store)."""
    path = save_tiny_model(tmp_path / "g", arch="gemma2", seed=3)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "some calibration text"}) + "\n")
    store = estimate_fisher(path, data, tmp_path / "f", granularity="nodes", progress=False)
    assert store.config["store_dtype"] == "bfloat16" and len(store.names) == 14


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_fused_layouts_map_segments_in_the_weights_orientation(arch: str) -> None:
    """Phi-3: qkv_proj rows are q | k | v heads, gate_up_proj rows gate | up neurons. GPT-2:
    Conv1D weights are [in, out], so output values lie along columns."""
    model = tiny_model(arch)
    examples = random_examples(LENGTHS[:3], model.config.vocab_size, seed=5)
    result = compute_fisher(model, examples, EstimateConfig(granularity="nodes", batch_size=3))
    layer = find_layers(model)[1]
    values = result.collector.node_values(len(examples))
    heads, kv, neurons = (values[f"{layer.prefix}.{k}"].float() for k in ("heads", "kv", "neurons"))
    d = layer.head_dim
    qkv = torch.cat([heads.repeat_interleave(d), kv.repeat_interleave(d), kv.repeat_interleave(d)])
    weights = dict(model.named_parameters())
    fisher, p = result.fisher, layer.prefix
    if arch == "phi3":
        torch.testing.assert_close(fisher[f"{p}.self_attn.qkv_proj.weight"], qkv[:, None])
        torch.testing.assert_close(
            fisher[f"{p}.mlp.gate_up_proj.weight"], neurons.repeat(2)[:, None]
        )
        torch.testing.assert_close(fisher[f"{p}.mlp.down_proj.weight"], neurons[None, :])
    else:
        torch.testing.assert_close(fisher[f"{p}.attn.c_attn.weight"], qkv[None, :])
        torch.testing.assert_close(fisher[f"{p}.attn.c_attn.bias"], qkv)
        torch.testing.assert_close(
            fisher[f"{p}.attn.c_proj.weight"], heads.repeat_interleave(d)[:, None]
        )
        torch.testing.assert_close(fisher[f"{p}.mlp.c_proj.weight"], neurons[:, None])
    for name, tensor in fisher.items():
        assert torch.broadcast_shapes(tensor.shape, weights[name].shape) == weights[name].shape
