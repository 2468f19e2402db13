"""Gram statistics for RegMean: batched, padded and shared equals a naive per-layer loop."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import save_tiny_model

from mergekit_fisher.data import Example, pad_batch
from mergekit_fisher.gram import GramHooks


def naive_grams(model: torch.nn.Module, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """One hook per linear layer, batch 1, no padding, float64: sum x x^T / tokens."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def record(m, inputs, out, name=name):  # type: ignore[no-untyped-def]
                x = inputs[0][0].double()
                sums[name] = sums.get(name, 0) + x.T @ x

            handles.append(module.register_forward_hook(record))
    with torch.no_grad():
        for ids in sequences:
            model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    tokens = sum(len(s) for s in sequences)
    return {name: total / tokens for name, total in sums.items()}


def test_batched_grams_match_naive_and_share_inputs(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "m", seed=4)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(7, 50, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7)]
    with GramHooks(model) as hooks:
        for batch in (sequences[:3], sequences[3:]):
            examples = [Example(tuple(s), (False,) + (True,) * (len(s) - 1)) for s in batch]
            padded = pad_batch(examples, pad_id=0)
            hooks.forward(padded.input_ids, padded.attention_mask)
    grams = hooks.accumulator.grams()
    ref = naive_grams(model, sequences)
    consumers = hooks.accumulator.consumers
    assert (
        consumers["model.layers.0.self_attn.k_proj.weight"]
        == consumers["model.layers.0.self_attn.q_proj.weight"]
    )
    assert (
        consumers["model.layers.1.mlp.up_proj.weight"]
        == consumers["model.layers.1.mlp.gate_proj.weight"]
    )
    assert len(set(consumers.values())) == 2 * 4 + 1  # per layer: qkv, o, gate/up, down; lm_head
    for weight, key in consumers.items():
        torch.testing.assert_close(
            grams[key].double(), ref[weight.removesuffix(".weight")], rtol=1e-6, atol=1e-7
        )


def test_tied_lm_head_is_skipped(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "t", seed=5, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with GramHooks(model) as hooks:
        hooks.forward(torch.tensor([[1, 8, 9, 10]]), torch.ones(1, 4, dtype=torch.int64))
    assert "lm_head.weight" not in hooks.accumulator.consumers
