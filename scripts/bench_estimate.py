"""Benchmark: Fisher estimation vs a plain training step, same model, same batch shape, one run.

Prints tokens/s of (a) a batched training step (forward + backward with parameter gradients,
no optimizer), (b) the full per-example Fisher estimator, (c) the mask-node estimator and
(d) RegMean's Gram statistics (forward + X^T X), their ratios to (a), peak GPU memory, and
store bytes of nodes vs full (measured at the benchmark size, analytic at the 1.1B Llama shape).

The phases are interleaved: each of ``--rounds`` rounds times ``--steps`` steps of every phase
in turn, and each ratio is taken within its round (against (a) of the same round), so load
from other jobs hits the anchor and the estimators alike; the table gives the median ratio and
the range over rounds. Each estimator's collector (its accumulators) is built once, untimed,
as in a real run of many batches; its build time is printed separately.

    python scripts/bench_estimate.py --preset cpu      # ~1 min on 2 CPU cores
    python scripts/bench_estimate.py --preset h100     # TinyLlama-1.1B shape, seq 1024, bf16
    python scripts/bench_estimate.py --model PATH --seq-len 64 256 1024   # any local model
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from mergekit_fisher.data import Example
from mergekit_fisher.estimate import EstimateConfig, compute_fisher
from mergekit_fisher.estimate.nodes import find_layers
from mergekit_fisher.estimate.runner import make_collector, prepare_model
from mergekit_fisher.estimate.taps import BatchState

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(hidden=256, intermediate=704, layers=4, heads=8, kv=4, vocab=4096, seq=256,
                batch=4, steps=3, dtype="float32", device="cpu"),
    "h100": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv=4, vocab=32000,
                 seq=1024, batch=8, steps=10, dtype="bfloat16", device="cuda"),
}  # fmt: skip
LLAMA_1B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv=4, vocab=32000)
PHASES: dict[str, dict[str, str]] = {
    "(b) Fisher, full": {"granularity": "full"},
    "(c) Fisher, nodes": {"granularity": "nodes"},
    "(d) Gram (RegMean)": {"statistic": "gram"},
}
TRAIN = "(a) training step"


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


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


@dataclass
class Phase:
    """One timed workload: ``step`` runs one batch; rates and peak memory over rounds."""

    step: Callable[[], Any]
    rates: list[float] = field(default_factory=list)
    peak: float | None = None


def train_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """Forward + backward with parameter gradients, the batch loss as in training."""

    def step() -> None:
        model.requires_grad_(True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        for p in model.parameters():
            p.grad = None
        model.requires_grad_(False)

    return step


def estimate_step(
    model: nn.Module, ids: torch.Tensor, settings: dict[str, str]
) -> tuple[Callable[[], Any], float]:
    """One batch of an estimator (sampled mode, one draw) and its collector's build seconds."""
    b, t = ids.shape
    examples = [Example(tuple(r), (False,) + (True,) * (t - 1)) for r in ids.cpu().tolist()]
    config = EstimateConfig(batch_size=b, progress=False, **settings)
    began = time.perf_counter()
    prepare_model(model, config)
    collector = make_collector(model, BatchState(), config)
    sync(ids.device)
    built = time.perf_counter() - began

    def step() -> Any:
        return compute_fisher(model, examples, config, collector=collector)

    return step, built


def run_phases(
    phases: dict[str, Phase], tokens: int, steps: int, rounds: int, device: torch.device
) -> None:
    """Warm every phase up once, then ``rounds`` interleaved rounds of ``steps`` steps each."""
    for phase in phases.values():
        phase.step()
    for _ in range(rounds):
        for phase in phases.values():
            sync(device)
            reset_peak(device)
            began = time.perf_counter()
            for _ in range(steps):
                phase.step()
            sync(device)
            phase.rates.append(tokens * steps / (time.perf_counter() - began))
            peak = peak_gib(device)
            phase.peak = peak if phase.peak is None or peak is None else max(phase.peak, peak)


def report(phases: dict[str, Phase]) -> None:
    anchor = phases[TRAIN].rates
    head = f"{'':22}{'tokens/s':>12}{'x train':>10}{'range':>14}{'peak GPU mem':>14}"
    print(head)
    for label, phase in phases.items():
        ratios = [r / a for r, a in zip(phase.rates, anchor, strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        mem = f"{phase.peak:.2f} GiB" if phase.peak is not None else "n/a (CPU)"
        print(
            f"{label:22}{statistics.median(phase.rates):12,.0f}"
            f"{statistics.median(ratios):10.2f}{spread:>14}{mem:>14}"
        )


def bench_shape(
    model: nn.Module, vocab: int, batch: int, seq: int, args: argparse.Namespace
) -> None:
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    phases = {TRAIN: Phase(train_step(model, ids))}
    built: dict[str, float] = {}
    for label, settings in PHASES.items():
        step, built[label] = estimate_step(model, ids, settings)
        phases[label] = Phase(step)
    print(
        f"\nshape: batch {batch} x seq {seq}; {args.rounds} interleaved rounds of {args.steps} steps"
    )
    run_phases(phases, batch * seq, args.steps, args.rounds, device)
    report(phases)
    print(
        "collector build (once per run): "
        + ", ".join(f"{k[4:]} {v:.2f} s" for k, v in built.items())
    )


def store_sizes(model: nn.Module) -> None:
    """Stored elements (bf16) of full vs node stores for ``model`` and the 1.1B Llama shape."""
    full, nodes = store_elements(model)
    with torch.device("meta"):
        big = AutoModelForCausalLM.from_config(llama_config(LLAMA_1B))
    full_1b, nodes_1b = store_elements(big)
    print(f"store (bf16): full {full * 2 / 1024**2:.2f} MiB, nodes {nodes * 2 / 1024:.1f} KiB, "
          f"1/{full / nodes:.0f}; at the 1.1B Llama shape: full {full_1b * 2 / 1e9:.2f} GB, "
          f"nodes {nodes_1b * 2 / 1e6:.2f} MB, 1/{full_1b / nodes_1b:.0f}")  # fmt: skip


def store_elements(model: nn.Module) -> tuple[int, int]:
    full = sum(p.numel() for p in model.parameters())
    nodes = sum(
        2 * layer.heads * layer.head_dim
        + 2 * layer.kv_heads * layer.head_dim
        + 3 * math.prod(layer.neuron_shape)
        for layer in find_layers(model)
    )
    return full, nodes


def load_model(args: argparse.Namespace, s: dict[str, Any]) -> tuple[nn.Module, str]:
    """The ``--model`` directory, or a random Llama of the preset's shape; and its description."""
    device = torch.device(args.device or s["device"])
    dtype = getattr(torch, args.dtype or s["dtype"])
    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        desc = f"{args.model} ({type(model).__name__})"
    else:
        model = AutoModelForCausalLM.from_config(llama_config(s))
        desc = (f"random Llama (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads / "
                f"{s['kv']} kv, vocab {s['vocab']})")  # fmt: skip
    model = model.to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    )
    return model, f"{desc}, {n_params / 1e6:.1f}M params, {dtype} on {where}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--model", help="a local model directory (instead of the preset's shape)")
    parser.add_argument("--device", help="default: the preset's (cpu, resp. cuda)")
    parser.add_argument("--dtype", help="default: the preset's (float32, resp. bfloat16)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int, nargs="+", help="one or more sequence lengths")
    parser.add_argument("--steps", type=int, help="timed steps per phase and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    s = dict(PRESETS[args.preset])
    args.steps = args.steps or s["steps"]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, desc = load_model(args, s)
    print(f"model: {desc}")
    vocab = model.get_output_embeddings().weight.shape[0]
    for seq in args.seq_len or [s["seq"]]:
        bench_shape(model, vocab, args.batch_size or s["batch"], seq, args)
    store_sizes(model)


if __name__ == "__main__":
    main()
