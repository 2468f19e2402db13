"""Naive references for the estimator tests: batch-1 autograd loops, written for clarity.

The estimator must match these: same definition (docs/fisher.md), same label-draw rule
(``sample_targets`` is the rule itself, shared on purpose), nothing else shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
    check). Returns ``<layer>.heads``, ``<layer>.neurons`` and ``<layer>.vmask`` Fisher values."""
    model.eval()
    config = model.config
    heads = config.num_attention_heads
    masks: dict[str, torch.Tensor] = {}
    handles = []
    dtype = next(model.parameters()).dtype
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.o_proj.in_features // heads
        kv = attn.k_proj.out_features // d
        m_h = torch.ones(heads, dtype=dtype, requires_grad=True)
        m_n = torch.ones(mlp.down_proj.in_features, dtype=dtype, requires_grad=True)
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

        def v_hook(mod, args, out, m=m_v, d=d):  # type: ignore[no-untyped-def]
            return (out.view(*out.shape[:-1], -1, d) * m[:, None]).reshape(out.shape)

        handles += [
            attn.o_proj.register_forward_pre_hook(head_hook),
            mlp.down_proj.register_forward_pre_hook(neuron_hook),
            attn.v_proj.register_forward_hook(v_hook),
        ]
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
