"""The merge benchmark's inputs: synthetic Llama-shaped models and the stores bound to them.

``scripts/bench_merge.py`` times merges of what this module writes into its workdir:
``model_M`` (random bf16 weights, sharded safetensors + ``config.json``), ``fisher_M`` (a
full-size bf16 Fisher store) and, for ``regmean``, ``gram_M`` (float32 SPD Grams shared the way
the estimator shares them). A manifest records what was generated, for ``--reuse``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

MANIFEST = "bench_manifest.json"

# name: (hidden, layers, intermediate, vocab, heads)
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 2, 384, 1024, 4),
    "0.1B": (512, 12, 2048, 32000, 8),
    "0.5B": (1024, 24, 4096, 50304, 16),
    "1B": (2048, 16, 5632, 32000, 32),
}


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


def spec_of(args: argparse.Namespace) -> dict[str, Any]:
    """What the generated files depend on (compared by ``--reuse``)."""
    return {
        "hidden": args.hidden,
        "layers": args.layers,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "models": args.models,
        "seed": args.seed,
        "model_shard_size": args.model_shard_size,
        "store_shard_size": args.store_shard_size,
    }


def write_model(out: Path, args: argparse.Namespace, weights: dict[str, Any]) -> None:
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
    write_safetensors(weights, out, "model", args.model_shard_size)


def generate(workdir: Path, args: argparse.Namespace) -> None:
    """Write ``--models`` random models and their full-size bf16 Fisher stores."""
    import torch

    from mergekit_fisher.store import write_store

    shapes = tensor_shapes(args)
    for m in range(args.models):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed * 1000 + m)
        weights: dict[str, torch.Tensor] = {}
        fisher: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            w = torch.randn(shape, generator=gen).mul_(0.02)
            if len(shape) == 1:  # norm weights: around 1, as trained ones are
                w.add_(1.0)
            weights[name] = w.to(torch.bfloat16)
            del w
            # Non-negative, spanning several orders of magnitude like a real diagonal Fisher.
            f = torch.rand(shape, generator=gen).pow_(4).mul_(1e-3)
            fisher[name] = f.to(torch.bfloat16)
            del f
        model_dir = workdir / f"model_{m}"
        store_dir = workdir / f"fisher_{m}"
        write_model(model_dir, args, weights)
        write_store(
            store_dir,
            fisher,
            weights=weights,
            model=str(model_dir),
            store_dtype=torch.bfloat16,
            shard_size=args.store_shard_size,
            overwrite=True,
            estimator={"mode": "synthetic", "note": "random values from scripts/bench_merge.py"},
        )
        del weights, fisher
        _flush(input_files(model_dir) + input_files(store_dir))
        print(f"  wrote model_{m} + fisher_{m} in {time.perf_counter() - t0:.1f} s", flush=True)


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


def generate_grams(workdir: Path, args: argparse.Namespace) -> None:
    """A float32 Gram store per model: a random SPD ``A A^T / n + 0.01 I`` per input."""
    import torch
    from safetensors import safe_open

    from mergekit_fisher.store import write_store

    consumers = gram_inputs(args)
    shapes = tensor_shapes(args)
    for m in range(args.models):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed * 1000 + 500 + m)
        grams: dict[str, torch.Tensor] = {}
        for name, key in consumers.items():
            if key not in grams:
                dim = shapes[name][1]
                a = torch.randn(dim, 256, generator=gen)
                grams[key] = (a @ a.T).div_(256).add_(torch.eye(dim), alpha=0.01)
        model_dir = workdir / f"model_{m}"
        weights = {}
        for path in input_files(model_dir):
            with safe_open(str(path), framework="pt") as handle:
                names = set(handle.keys()) & set(consumers)
                weights.update({n: handle.get_tensor(n) for n in names})
        store_dir = workdir / f"gram_{m}"
        write_store(
            store_dir,
            grams,
            weights=weights,
            model=str(model_dir),
            statistic="gram",
            consumers=consumers,
            store_dtype=torch.float32,
            shard_size=args.store_shard_size,
            overwrite=True,
            estimator={"mode": "synthetic", "note": "random SPD Grams from scripts/bench_merge.py"},
        )
        del grams, weights
        _flush(input_files(store_dir))
        print(f"  wrote gram_{m} in {time.perf_counter() - t0:.1f} s", flush=True)


def _flush(paths: list[Path]) -> None:
    """Flush written inputs to disk, so that ``--cold`` can evict them from the page cache."""
    for path in paths:
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())


def input_files(directory: Path) -> list[Path]:
    """The safetensors files of a model or store directory (what a merge reads)."""
    return sorted(directory.glob("*.safetensors"))


def prepare_workdir(workdir: Path, args: argparse.Namespace) -> None:
    """Generate the inputs unless ``--reuse`` finds a complete, matching set."""
    manifest = workdir / MANIFEST
    record: dict[str, Any] | None = None
    if args.reuse and manifest.exists():
        try:
            record = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            record = None
        if record is not None and record.get("spec") == spec_of(args):
            print(f"reusing synthetic models and stores in {workdir}", flush=True)
        else:
            print("workdir holds other inputs: regenerating", flush=True)
            record = None
    if record is None:
        manifest.unlink(missing_ok=True)
        for m in range(args.models):
            for sub in (f"model_{m}", f"fisher_{m}", f"gram_{m}"):
                shutil.rmtree(workdir / sub, ignore_errors=True)
        print(f"writing {args.models} synthetic models + Fisher stores to {workdir}", flush=True)
        generate(workdir, args)
        record = {"spec": spec_of(args)}
        manifest.write_text(json.dumps(record, indent=2))
    if "regmean" in args.methods and not record.get("grams"):
        print(f"writing {args.models} synthetic Gram stores to {workdir}", flush=True)
        generate_grams(workdir, args)
        record["grams"] = True
        manifest.write_text(json.dumps(record, indent=2))
