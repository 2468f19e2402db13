"""Where a weight sits in a decoder: its layer number and module kind, from its name alone.

``inspect`` and ``compare`` group Fisher mass by (layer, module) for any architecture, without
loading the model: names are matched by their last components (``self_attn.q_proj.weight`` ->
``q``, GPT-2's ``attn.c_attn`` -> ``qkv``, Mixtral's fused ``experts.gate_up_proj`` ->
``gate_up``; Qwen2-MoE's ``shared_expert_gate`` -> ``router``). Unknown names fall into
``other``.
"""

from __future__ import annotations

import re

MODULES = (
    "embeddings", "q", "k", "v", "qkv", "o", "router", "gate", "up", "gate_up", "down",
    "norms", "other",
)  # fmt: skip
"""Display order of module kinds (columns of the pictures)."""

_BY_COMPONENT = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "dense": "o", "out_proj": "o",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "Wqkv": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
    "c_fc": "up", "fc1": "up", "fc_in": "up", "w1": "gate", "w3": "up", "fc2": "down",
    "fc_out": "down", "w2": "down", "router": "router", "shared_expert_gate": "router",
    "embed_tokens": "embeddings", "wte": "embeddings", "wpe": "embeddings",
    "lm_head": "embeddings", "embed_in": "embeddings", "embed_out": "embeddings",
}  # fmt: skip
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_DIGITS = re.compile(r"(\d+)")


def layer_of(name: str) -> int | None:
    """The decoder layer number in a weight name (``model.layers.12.mlp...`` -> 12), if any."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    """The module kind of a weight name, one of :data:`MODULES`."""
    parts = name.split(".")
    if any("norm" in p or p.startswith("ln") for p in parts[-2:]):
        return "norms"
    for part in reversed(parts[:-1] if len(parts) > 1 else parts):
        if part == "c_proj":  # GPT-2 / Starcoder2: the attention output or the MLP output
            return "o" if "attn" in name else "down"
        if part == "gate":  # an MoE router (Mixtral's, Qwen3-MoE's, OLMoE's mlp.gate)
            return "router"
        if part in _BY_COMPONENT:
            return _BY_COMPONENT[part]
    if parts[-1] in _BY_COMPONENT:  # fused experts: mlp.experts.gate_up_proj (a parameter)
        return _BY_COMPONENT[parts[-1]]
    return "other"


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(name))
