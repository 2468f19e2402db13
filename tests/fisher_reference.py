"""Naive references for the estimator tests: batch-1 autograd loops, written for clarity.

The estimator must match these: same definition (docs/fisher.md), same label-draw rule
(``sample_targets`` is the rule itself, shared on purpose), nothing else shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_fisher.data import Example
from mergekit_fisher.estimate import sample_targets


def _targets(model: nn.Module, ex: Example, mode: str, seed: int, index: int, draw: int):  # type: ignore[no-untyped-def]
    ids = torch.tensor(ex.input_ids)[None]
    logits = model(input_ids=ids).logits[0, :-1]
    logp = torch.log_softmax(logits, -1)
    pos = torch.tensor([t - 1 for t in range(len(ex.input_ids)) if ex.target_mask[t]])
    if mode == "empirical":
        labels = ids[0, pos + 1]
    else:
        labels = sample_targets(logits[pos].detach(), seed, index, draw)
    return logp, pos, labels


def naive_fisher(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    mode: str = "empirical",
    samples: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """F = 1/N sum_n 1/K sum_k (grad sum_t log p(y_t|x_<t))^2, one example at a time."""
    model.eval()
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for n, ex in enumerate(examples):
            for k in range(samples if mode == "sampled" else 1):
                logp, pos, labels = _targets(model, ex, mode, seed, n, k)
                grads = torch.autograd.grad(logp[pos, labels].sum(), list(params.values()))
                for name, g in zip(params, grads):
                    acc[name] += g * g / (samples if mode == "sampled" else 1)
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return {k: v / len(examples) for k, v in acc.items()}


def naive_node_fisher(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    mode: str = "empirical",
    samples: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Explicit mask tensors (ones, requiring grad): one per query head at each o_proj input,
    one per neuron at each down_proj input, and one per kv head on each v_proj output (the GQA
    check; on the v rows of a fused qkv projection). Returns ``<layer>.heads``,
    ``<layer>.neurons`` and ``<layer>.vmask`` Fisher values. Fused layouts: Phi-3
    (qkv_proj, gate_up_proj), Starcoder2 (mlp.c_fc/c_proj), GPT-2 (Conv1D c_attn/c_proj). Sparse
    MoE layers: one mask per expert neuron [E, I] in a token-by-token experts forward."""
    model.eval()
    config = model.config
    heads = config.num_attention_heads
    masks: dict[str, torch.Tensor] = {}
    handles = []
    dtype = next(model.parameters()).dtype
    gpt2 = hasattr(model, "transformer")
    layers = model.transformer.h if gpt2 else model.model.layers
    for i, layer in enumerate(layers):
        prefix = f"transformer.h.{i}" if gpt2 else f"model.layers.{i}"
        attn = layer.attn if gpt2 else layer.self_attn
        o = attn.c_proj if gpt2 else getattr(attn, "o_proj", None) or attn.dense  # Phi-1/2
        experts = getattr(layer.mlp, "experts", None)
        sites = (getattr(layer.mlp, n, None) for n in ("down_proj", "c_proj", "fc2"))
        down = None if experts is not None else next(m for m in sites if m is not None)
        d = (attn.c_proj.weight.shape[0] if gpt2 else o.in_features) // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        if experts is not None:
            width = experts.down_proj.shape[::2]  # [E, I]
        else:
            width = down.weight.shape[0] if gpt2 else down.in_features
        m_h = torch.ones(heads, dtype=dtype, requires_grad=True)
        m_n = torch.ones(width, dtype=dtype, requires_grad=True)
        m_v = torch.ones(kv, dtype=dtype, requires_grad=True)
        masks[f"{prefix}.heads"], masks[f"{prefix}.neurons"], masks[f"{prefix}.vmask"] = (
            m_h,
            m_n,
            m_v,
        )

        def head_hook(mod, args, m=m_h, d=d):  # type: ignore[no-untyped-def]
            x = args[0]
            return ((x.view(*x.shape[:-1], -1, d) * m[:, None]).reshape(x.shape),)

        def neuron_hook(mod, args, m=m_n):  # type: ignore[no-untyped-def]
            return (args[0] * m,)

        def v_hook(mod, args, out, m=m_v, d=d, kv=kv):  # type: ignore[no-untyped-def]
            # the last kv * d outputs are the values (v_proj: all of them)
            v = out[..., out.shape[-1] - kv * d :]
            v = (v.reshape(*v.shape[:-1], kv, d) * m[:, None]).reshape(v.shape)
            return torch.cat([out[..., : out.shape[-1] - kv * d], v], -1)

        v_site = attn.c_attn if gpt2 else getattr(attn, "v_proj", None) or attn.qkv_proj
        handles += [o.register_forward_pre_hook(head_hook), v_site.register_forward_hook(v_hook)]
        if experts is not None:
            handles.append(experts.register_forward_hook(_masked_experts(m_n)))
        else:
            handles.append(down.register_forward_pre_hook(neuron_hook))
    acc = {k: torch.zeros_like(m) for k, m in masks.items()}
    try:
        for n, ex in enumerate(examples):
            draws = samples if mode == "sampled" else 1
            for k in range(draws):
                logp, pos, labels = _targets(model, ex, mode, seed, n, k)
                grads = torch.autograd.grad(logp[pos, labels].sum(), list(masks.values()))
                for name, g in zip(masks, grads):
                    acc[name] += g * g / draws
    finally:
        for h in handles:
            h.remove()
    return {k: v / len(examples) for k, v in acc.items()}


def _masked_experts(mask: torch.Tensor):  # type: ignore[no-untyped-def]
    """A forward hook replacing a fused experts layer's output by a token-by-token loop whose
    activation of expert e is multiplied by ``mask[e]``."""

    def hook(experts, args, out):  # type: ignore[no-untyped-def]
        x, index, weights = args
        rows = []
        for t in range(x.shape[0]):
            y = torch.zeros_like(x[t])
            for k, e in enumerate(index[t].tolist()):
                gate, up = F.linear(x[t], experts.gate_up_proj[e]).chunk(2)
                a = experts.act_fn(gate) * up * mask[e]
                y = y + weights[t, k] * F.linear(a, experts.down_proj[e])
            rows.append(y)
        return torch.stack(rows)

    return hook


def random_examples(
    lengths: Sequence[int], vocab: int, seed: int = 0, prompt: int = 0
) -> list[Example]:
    """Ragged examples; the first ``prompt`` tokens of each (when it is long enough) masked."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        cut = prompt if n > prompt + 1 else 1
        out.append(Example(tuple(ids), tuple(t >= max(cut, 1) for t in range(n))))
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / scale if scale else a.abs().max().item()
