"""Where a weight sits, from its name alone: layer numbers, module kinds, natural order."""

from __future__ import annotations

import pytest

from mergekit_fisher.layout import MODULES, layer_of, module_of, natural_key


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.embed_tokens.weight", "embeddings"),
        ("lm_head.weight", "embeddings"),
        ("model.layers.3.self_attn.q_proj.weight", "q"),
        ("model.layers.3.self_attn.k_proj.bias", "k"),
        ("model.layers.3.self_attn.qkv_proj.weight", "qkv"),  # Phi-3
        ("transformer.h.0.attn.c_attn.weight", "qkv"),  # GPT-2
        ("transformer.h.0.attn.c_proj.weight", "o"),
        ("transformer.h.0.mlp.c_proj.weight", "down"),
        ("model.layers.0.mlp.gate_proj.weight", "gate"),
        ("model.layers.0.mlp.up_proj.weight", "up"),
        ("model.layers.0.mlp.down_proj.weight", "down"),
        ("model.layers.1.mlp.gate.weight", "router"),  # Mixtral / Qwen3-MoE router
        ("model.layers.1.mlp.experts.gate_up_proj", "gate_up"),  # fused experts
        ("model.layers.1.mlp.experts.down_proj", "down"),
        ("model.layers.1.mlp.shared_expert.gate_proj.weight", "gate"),  # Qwen2-MoE
        ("model.layers.1.mlp.shared_expert_gate.weight", "router"),
        ("model.layers.1.input_layernorm.weight", "norms"),
        ("transformer.h.0.ln_1.bias", "norms"),
        ("model.layers.1.mystery.weight", "other"),
    ],
)
def test_module_of(name: str, kind: str) -> None:
    assert module_of(name) == kind and kind in MODULES


def test_layer_numbers_and_natural_order() -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("model.embed_tokens.weight") is None
    names = ["model.layers.10.mlp", "model.layers.2.mlp", "model.layers.1.mlp"]
    assert sorted(names, key=natural_key) == names[::-1]
