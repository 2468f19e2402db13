"""Benchmark: Fisher estimation vs a plain training step, same model, same batch shape, one run.

Prints tokens/s of (a) a batched training step (forward + backward with parameter gradients,
no optimizer), (b) the full per-example Fisher estimator, (c) the mask-node estimator and
(d) RegMean's Gram statistics (forward + X^T X), their ratios to (a), peak GPU memory, and store bytes of nodes vs full (measured at the benchmark
size, analytic at the 1.1B Llama shape).

    python scripts/bench_estimate.py --preset cpu      # ~1 min on 2 CPU cores
    python scripts/bench_estimate.py --preset h100     # TinyLlama-1.1B shape, seq 1024, bf16
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mergekit_fisher.data import Example
from mergekit_fisher.estimate import EstimateConfig, compute_fisher
from mergekit_fisher.estimate.nodes import NodeCollector, find_layers

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(hidden=256, intermediate=704, layers=4, heads=8, kv=4, vocab=4096, seq=256,
                batch=4, steps=3, dtype="float32", device="cpu"),
    "h100": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv=4, vocab=32000,
                 seq=1024, batch=8, steps=10, dtype="bfloat16", device="cuda"),
}  # fmt: skip
LLAMA_1B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv=4, vocab=32000)


def llama_config(s: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=max(s.get("seq", 2048), 2048),
        tie_word_embeddings=False,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 1024**3:.2f} GiB"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_train(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Tokens/s of forward + backward (parameter grads), the batch loss as in training."""
    model.requires_grad_(True)
    device = ids.device

    def step() -> None:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        for p in model.parameters():
            p.grad = None

    step()
    sync(device)
    reset_peak(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    model.requires_grad_(False)
    return ids.numel() * steps / (time.perf_counter() - began)


def bench_fisher(
    model: torch.nn.Module, ids: torch.Tensor, steps: int, **settings: Any
) -> tuple[float, Any]:
    """Tokens/s of the estimator on the same batches (sampled mode, one draw)."""
    b, t = ids.shape
    rows = ids.cpu().tolist()
    examples = [Example(tuple(r), (False,) + (True,) * (t - 1)) for r in rows]
    config = EstimateConfig(batch_size=b, progress=False, **settings)
    compute_fisher(model, examples, config)  # warm-up (and allocator)
    sync(ids.device)
    reset_peak(ids.device)
    began = time.perf_counter()
    result = None
    for _ in range(steps):
        result = compute_fisher(model, examples, config)
    sync(ids.device)
    return b * t * steps / (time.perf_counter() - began), result


def store_bytes(fisher: dict[str, torch.Tensor], itemsize: int = 2) -> int:
    return sum(t.numel() * itemsize for t in fisher.values())


def analytic_ratio(shape: dict[str, Any]) -> tuple[int, int]:
    """(full, nodes) stored elements at a shape, from a meta-device model (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(shape))
    full = sum(p.numel() for p in model.parameters())
    nodes = 0
    for layer in find_layers(model):
        d = layer.head_dim
        nodes += 2 * layer.heads * d + 2 * layer.kv_heads * d + 3 * layer.neurons
    return full, nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    s = dict(PRESETS[args.preset])
    s.update(
        {
            k: v
            for k, v in {"batch": args.batch_size, "seq": args.seq_len, "steps": args.steps}.items()
            if v
        }
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(s["device"])
    dtype = getattr(torch, s["dtype"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(s)).to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    )
    print(f"model: Llama {n_params / 1e6:.1f}M params (hidden {s['hidden']}, {s['layers']} layers, "
          f"{s['heads']} heads / {s['kv']} kv, vocab {s['vocab']}), {s['dtype']} on {name}")  # fmt: skip
    print(f"shape: batch {s['batch']} x seq {s['seq']}, {s['steps']} timed steps each")

    train = bench_train(model, ids, s["steps"])
    train_mem = peak_gib(device)
    full, full_result = bench_fisher(model, ids, s["steps"], granularity="full")
    full_mem = peak_gib(device)
    nodes, nodes_result = bench_fisher(model, ids, s["steps"], granularity="nodes")
    nodes_mem = peak_gib(device)
    gram, _ = bench_fisher(model, ids, s["steps"], statistic="gram")
    gram_mem = peak_gib(device)
    print(f"{'':22}{'tokens/s':>12}{'x train':>10}{'peak GPU mem':>16}")
    for label, rate, mem in [
        ("(a) training step", train, train_mem),
        ("(b) Fisher, full", full, full_mem),
        ("(c) Fisher, nodes", nodes, nodes_mem),
        ("(d) Gram (RegMean)", gram, gram_mem),
    ]:
        print(f"{label:22}{rate:12,.0f}{rate / train:10.2f}{mem:>16}")
    fb, nb = store_bytes(full_result.fisher), store_bytes(nodes_result.fisher)
    print(f"store (bf16 tensors): full {fb / 1024**2:.2f} MiB, nodes {nb / 1024:.1f} KiB, "
          f"ratio 1/{fb / nb:.0f} at this size")  # fmt: skip
    full_1b, nodes_1b = analytic_ratio(LLAMA_1B)
    print(f"analytic at the 1.1B Llama shape: full {full_1b * 2 / 1e9:.2f} GB, nodes "
          f"{nodes_1b * 2 / 1e6:.2f} MB, ratio 1/{full_1b / nodes_1b:.0f}")  # fmt: skip
    assert isinstance(nodes_result.collector, NodeCollector) and math.isfinite(nodes)


if __name__ == "__main__":
    main()
