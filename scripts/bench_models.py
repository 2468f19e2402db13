"""The merge benchmark's inputs: synthetic Llama-shaped models and the stores bound to them.

``scripts/bench_merge.py`` times merges of what this module writes: ``model_M`` (random bf16
weights, sharded safetensors + ``config.json``), ``fisher_M`` (a bf16 Fisher store: full-size,
or with ``--granularity nodes`` one value per head and neuron, as the mask-node estimator
writes) and, for ``regmean``, ``gram_M`` (float32 SPD Grams shared the way the estimator shares
them). Inputs live in one directory per spec (shape, seed, models, granularity, shard sizes,
where the random numbers were drawn) under ``--workdir`` and are reused whenever complete: a 3B
pair is written once. Random numbers come from the GPU when the bench merges on one (seconds
for 3.6B values), else from every CPU core (fixed blocks, each with its own generator, so the
values do not depend on the number of threads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MANIFEST = "bench_manifest.json"
RNG_BLOCK = 1 << 22
"""Elements per independently seeded block of CPU random numbers (4M)."""

# name: (hidden, layers, intermediate, vocab, heads, kv_heads)
PRESETS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (128, 2, 384, 1024, 4, 4),
    "0.1B": (512, 12, 2048, 32000, 8, 8),
    "0.5B": (1024, 24, 4096, 50304, 16, 16),
    "1B": (2048, 16, 5632, 32000, 32, 32),
    "3b": (3072, 28, 8192, 128256, 24, 8),  # Llama-3.2-3B
    "8b": (4096, 32, 14336, 128256, 32, 8),  # Llama-3.1-8B
}
NODE_ROWS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
"""Weights whose node Fisher is one value per output row (head or neuron): ``[out, 1]``."""
NODE_COLUMNS = ("o_proj", "down_proj")
"""Weights whose node Fisher is one value per input column: ``[1, in]``."""

Values = Callable[[int, "torch.Generator", str], "torch.Tensor"]


def tensor_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """Every weight of an untied Llama checkpoint with these dimensions, in module order."""
    h, i, v = args.hidden, args.intermediate, args.vocab
    kv = args.kv_heads * (h // args.heads)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (h, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def fisher_shape(name: str, shape: tuple[int, ...], granularity: str) -> tuple[int, ...] | None:
    """The stored Fisher's shape for a weight; None where a node store leaves it uncovered."""
    if granularity == "full":
        return shape
    if any(f".{m}." in name for m in NODE_ROWS):
        return (shape[0], 1)
    if any(f".{m}." in name for m in NODE_COLUMNS):
        return (1, shape[1])
    return None


def gram_inputs(args: argparse.Namespace) -> dict[str, str]:
    """Each linear weight's Gram key: one per distinct input (q/k/v and gate/up share one)."""
    consumers = {}
    for name, shape in tensor_shapes(args).items():
        if len(shape) != 2 or "embed_tokens" in name:
            continue
        key = name.removesuffix(".weight")
        for group, members in (
            ("qkv", ("q_proj", "k_proj", "v_proj")),
            ("gate_up", ("gate_proj", "up_proj")),
        ):
            for member in members:
                key = key.replace(member, group)
        consumers[name] = key + ".input"
    return consumers


def gram_dims(args: argparse.Namespace) -> dict[str, int]:
    """Each Gram key's dimension (its weights' input width)."""
    shapes = tensor_shapes(args)
    return {key: shapes[name][1] for name, key in gram_inputs(args).items()}


def disk_bytes(args: argparse.Namespace) -> dict[str, int]:
    """Bytes on disk of all models, all Fisher stores, all Gram stores, and one merge output."""
    shapes = tensor_shapes(args)
    model = 2 * sum(math.prod(s) for s in shapes.values())
    stored = (fisher_shape(n, s, args.granularity) for n, s in shapes.items())
    fisher = 2 * sum(math.prod(s) for s in stored if s is not None)
    gram = 4 * sum(d * d for d in gram_dims(args).values())
    return {
        "model": args.models * model,
        "fisher": args.models * fisher,
        "gram": args.models * gram,
        "output": model,
    }


def rng_device(args: argparse.Namespace) -> str:
    """Where random numbers are drawn: the GPU when the bench merges on one that exists."""
    import torch

    return "cuda" if args.cuda and torch.cuda.is_available() else "cpu"


def spec_of(args: argparse.Namespace) -> dict[str, Any]:
    """What the generated files depend on: their cache key."""
    return {
        "hidden": args.hidden,
        "layers": args.layers,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "models": args.models,
        "seed": args.seed,
        "granularity": args.granularity,
        "model_shard_size": args.model_shard_size,
        "store_shard_size": args.store_shard_size,
        "rng": rng_device(args),
    }


def input_dir(args: argparse.Namespace) -> Path:
    """``--workdir``'s subdirectory for this spec (a readable prefix and the spec's hash)."""
    spec = spec_of(args)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    name = f"h{args.hidden}-l{args.layers}-v{args.vocab}-{args.granularity}-{spec['rng']}-{digest}"
    return Path(args.workdir).expanduser().resolve() / name


# --------------------------------------------------------------------------- random values


def _weights(n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    import torch

    return torch.randn(n, generator=gen, device=device).mul_(0.02)


def _norms(n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """Around 1, as trained norm weights are."""
    return _weights(n, gen, device).add_(1.0)


def _fishers(n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """Non-negative, spanning several orders of magnitude like a real diagonal Fisher."""
    import torch

    return torch.rand(n, generator=gen, device=device).pow_(4).mul_(1e-3)


def seed_of(args: argparse.Namespace, model: int, name: str, kind: str) -> int:
    """A tensor's own seed: the same values whatever else is generated."""
    return zlib.crc32(f"{args.seed}/{model}/{name}/{kind}".encode())


def draw(shape: tuple[int, ...], seed: int, device: str, values: Values) -> torch.Tensor:
    """bf16 random ``values`` of ``shape`` on ``device``; on the CPU in RNG_BLOCK blocks drawn
    by a thread per core (torch's CPU generators are single-threaded)."""
    import torch

    numel = math.prod(shape)
    if device != "cpu":
        gen = torch.Generator(device=device).manual_seed(seed)
        return values(numel, gen, device).to(torch.bfloat16).reshape(shape)
    out = torch.empty(numel, dtype=torch.bfloat16)

    def block(start: int) -> None:
        gen = torch.Generator().manual_seed((seed << 16) + start // RNG_BLOCK)
        stop = min(numel, start + RNG_BLOCK)
        out[start:stop].copy_(values(stop - start, gen, "cpu"))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(block, range(0, numel, RNG_BLOCK)))
    return out.reshape(shape)


def draw_gram(dim: int, seed: int, device: str) -> torch.Tensor:
    """A random SPD ``A A^T / n + 0.01 I`` (float32), ``A`` of ``dim`` x 256."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(dim, 256, generator=gen, device=device)
    return (a @ a.T).div_(256).add_(torch.eye(dim, device=device), alpha=0.01)


# --------------------------------------------------------------------------- writing


def write_model(out: Path, args: argparse.Namespace, weights: dict[str, torch.Tensor]) -> None:
    """``config.json`` plus ``model.safetensors`` (or shards + index), bf16."""
    from transformers import LlamaConfig

    from mergekit_fisher.store import write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        architectures=["LlamaForCausalLM"],
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).to_json_file(str(out / "config.json"))
    write_safetensors({n: t.cpu() for n, t in weights.items()}, out, "model", args.model_shard_size)


def generate_model(directory: Path, args: argparse.Namespace, m: int) -> None:
    """``model_m``: random bf16 weights (norms around 1)."""
    device = rng_device(args)
    weights = {
        name: draw(
            shape, seed_of(args, m, name, "weight"), device, _norms if len(shape) == 1 else _weights
        )
        for name, shape in tensor_shapes(args).items()
    }
    write_model(directory / f"model_{m}", args, weights)


def model_weights(directory: Path, m: int, names: set[str]) -> dict[str, torch.Tensor]:
    """The weights of ``model_m`` that a store binds to (read back: from the page cache)."""
    from safetensors import safe_open

    weights = {}
    for path in input_files(directory / f"model_{m}"):
        with safe_open(str(path), framework="pt") as handle:
            weights.update({n: handle.get_tensor(n) for n in set(handle.keys()) & names})
    return weights


def generate_fisher(directory: Path, args: argparse.Namespace, m: int) -> None:
    """``fisher_m``: a bf16 Fisher store (full or nodes) bound to ``model_m``."""
    import torch

    from mergekit_fisher.store import write_store

    device = rng_device(args)
    fisher = {}
    for name, shape in tensor_shapes(args).items():
        stored = fisher_shape(name, shape, args.granularity)
        if stored is not None:
            fisher[name] = draw(stored, seed_of(args, m, name, "fisher"), device, _fishers)
    write_store(
        directory / f"fisher_{m}",
        fisher,
        weights=model_weights(directory, m, set(fisher)),
        model=str(directory / f"model_{m}"),
        granularity=args.granularity,
        store_dtype=torch.bfloat16,
        shard_size=args.store_shard_size,
        overwrite=True,
        estimator={"mode": "synthetic", "note": "random values from scripts/bench_merge.py"},
    )


def generate_grams(directory: Path, args: argparse.Namespace, m: int) -> None:
    """``gram_m``: a float32 Gram store of random SPD matrices, bound to ``model_m``."""
    import torch

    from mergekit_fisher.store import write_store

    consumers = gram_inputs(args)
    device = rng_device(args)
    grams = {
        key: draw_gram(dim, seed_of(args, m, key, "gram"), device)
        for key, dim in gram_dims(args).items()
    }
    write_store(
        directory / f"gram_{m}",
        grams,
        weights=model_weights(directory, m, set(consumers)),
        model=str(directory / f"model_{m}"),
        statistic="gram",
        consumers=consumers,
        store_dtype=torch.float32,
        shard_size=args.store_shard_size,
        overwrite=True,
        estimator={"mode": "synthetic", "note": "random SPD Grams from scripts/bench_merge.py"},
    )


def input_files(directory: Path) -> list[Path]:
    """The safetensors files of a model or store directory (what a merge reads)."""
    return sorted(directory.glob("*.safetensors"))


def _fsync(directory: Path) -> None:
    """Flush written inputs to disk, so that ``--cold`` can evict them from the page cache."""
    for path in input_files(directory):
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())


PARTS: dict[str, Callable[[Path, argparse.Namespace, int], None]] = {
    "model": generate_model,
    "fisher": generate_fisher,
    "gram": generate_grams,
}
"""Each kind of input (its directories are ``KIND_M``), by its generator (one model's)."""


def prepare_inputs(args: argparse.Namespace, parts: tuple[str, ...]) -> Path:
    """The spec's input directory, generating whichever of ``parts`` is missing."""
    directory = input_dir(args)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / MANIFEST
    record = json.loads(manifest.read_text()) if manifest.exists() else {}
    if record.get("spec") != spec_of(args):
        record = {"spec": spec_of(args), "parts": []}
    for part in ("model", *parts):
        if part in record["parts"]:
            print(f"reusing {part} inputs in {directory}", flush=True)
            continue
        for m in range(args.models):
            t0 = time.perf_counter()
            shutil.rmtree(directory / f"{part}_{m}", ignore_errors=True)
            PARTS[part](directory, args, m)
            if args.cold:
                _fsync(directory / f"{part}_{m}")
            print(f"  wrote {part}_{m} in {time.perf_counter() - t0:.1f} s", flush=True)
        record["parts"].append(part)
        manifest.write_text(json.dumps(record, indent=2))
    return directory
