"""Rehearsal at the Llama-3.1-8B shape: full, nodes and Gram estimation on one GPU, capped at
24 GiB and 48 GiB (``torch.cuda.set_per_process_memory_fraction`` plus ``--max-gpu-memory``)
and uncapped; tokens/s, peak GPU memory and whether each store opens (``mergekit-fisher
inspect``), in one table.

Random weights of the 8B shape (hidden 4096, MLP 14336, vocab 128256, 32 heads / 8 kv) are
generated on the GPU and written once to ``--workdir``; each case runs in its own process (a
fresh allocator and cap), writes its store, is inspected, and the store is deleted before the
next (the GPU machine has a 64 GB disk). Random token ids serve as data (no tokenizer).

    python scripts/rehearse_8b.py --dry-run          # tiny shapes on CPU, ~1 min: the plumbing
    python scripts/rehearse_8b.py --layers 16        # H100/H200: see docs/benchmarks.md
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

LOG = logging.getLogger("rehearse_8b")
LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=1000, max_position_embeddings=256,
)  # fmt: skip
CASES = {"full": {}, "nodes": {"granularity": "nodes"}, "gram": {"statistic": "gram"}}


def make_model(directory: Path, layers: int, dry_run: bool) -> None:
    """Random weights of the shape, made on the device they will run on, saved once."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (directory / "config.json").exists():
        return
    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False,
                         **(TINY if dry_run else LLAMA_8B))  # fmt: skip
    device, dtype = ("cpu", torch.float32) if dry_run else ("cuda", torch.bfloat16)
    began = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    n = sum(p.numel() for p in model.parameters())
    LOG.info("model: %.2fB parameters, %d layers, saved in %.0f s", n / 1e9, layers,
             time.perf_counter() - began)  # fmt: skip


def run_case(model_dir: Path, out: Path, case: str, cap_gib: float, args: dict) -> dict:
    """One estimate in this process (the child): the cap, the run, its rate and peak memory."""
    import torch

    from mergekit_fisher.data import CalibrationData, Example
    from mergekit_fisher.estimate import estimate_fisher

    cuda = not args["dry_run"]
    if cuda and cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(cap_gib * 1024**3 / total, 1.0))
    gen = torch.Generator().manual_seed(1)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    t = args["seq_len"]
    examples = tuple(
        Example(
            tuple(torch.randint(0, vocab, (t,), generator=gen).tolist()),
            (False,) + (True,) * (t - 1),
        )
        for _ in range(args["sequences"])
    )
    calib = CalibrationData(examples, f"random-{t}", ("random token ids",))
    began = time.perf_counter()
    store = estimate_fisher(
        model_dir, calib, out, progress=False, batch_size=args["batch_size"], max_length=t,
        device="cuda" if cuda else "cpu", dtype=None if cuda else "float32",
        max_gpu_memory=f"{cap_gib}GiB" if cap_gib else None, **CASES[case],
    )  # fmt: skip
    seconds = time.perf_counter() - began
    est = store.config["estimator"]
    peak = torch.cuda.max_memory_allocated() / 1024**3 if cuda else float("nan")
    plan = next(iter(est.get("memory_plan", {}).values()), {})
    return {
        "case": case, "cap": cap_gib, "tokens": est["num_tokens"], "seconds": seconds,
        "tokens_per_s": est["num_tokens"] / seconds, "peak_gib": peak,
        "offloaded": plan.get("offloaded_accumulators", 0),
        "checkpointing": plan.get("gradient_checkpointing", False),
    }  # fmt: skip


def inspect_ok(store: Path) -> bool:
    cmd = [sys.executable, "-m", "mergekit_fisher.cli", "inspect", str(store)]
    return subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def table(rows: list[dict], layers: int) -> str:
    uncapped = {r["case"]: r["tokens_per_s"] for r in rows if not r.get("cap")}
    lines = [f"{'case':6} {'cap':>7} {'layers':>6} {'tokens/s':>10} {'x uncapped':>10} "
             f"{'peak GiB':>9} {'offloaded':>9} {'ckpt':>5} {'inspect':>7} {'seconds':>7}"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:6} {r['cap'] or '-':>7} {layers:>6}  FAILED: {r['error']}")
            continue
        base = uncapped.get(r["case"])
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        lines.append(
            f"{r['case']:6} {(str(r['cap']) + 'G') if r['cap'] else '-':>7} {layers:>6} "
            f"{r['tokens_per_s']:>10,.0f} {ratio:>10} {r['peak_gib']:>9.2f} {r['offloaded']:>9} "
            f"{'on' if r['checkpointing'] else 'off':>5} {'ok' if r['inspect'] else 'FAIL':>7} "
            f"{r['seconds']:>7.1f}"
        )
    return "\n".join(lines)


@click.command()
@click.option("--dry-run", is_flag=True, help="Tiny shapes on CPU: checks the plumbing.")
@click.option("--layers", type=int, default=None, help="Decoder layers [32 = 8B; dry run: 2].")
@click.option("--sequences", type=int, default=16, show_default=True)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option(
    "--caps", default=None, help="GiB per case, 0: uncapped [0,48,24; dry run: 0,0.004,0.001]."
)
@click.option("--cases", default="full,nodes,gram", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default="/tmp/rehearse_8b")
@click.option("--child", default=None, hidden=True, help="CASE:CAP: run one case and print it.")
def main(dry_run: bool, layers: int | None, sequences: int, seq_len: int, batch_size: int, caps: str | None,
         cases: str, workdir: str, child: str | None) -> None:  # fmt: skip
    """Rehearse 8B-shaped estimation under GPU memory caps; one table at the end."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(workdir)
    model_dir, out = work / "model", work / "store"
    args = dict(dry_run=dry_run, sequences=sequences, seq_len=seq_len, batch_size=batch_size)
    if child is not None:
        case, cap = child.split(":")
        print("RESULT " + json.dumps(run_case(model_dir, out, case, float(cap), args)))
        return
    caps = caps or ("0,0.004,0.001" if dry_run else "0,48,24")
    layers = layers or (2 if dry_run else 32)
    work.mkdir(parents=True, exist_ok=True)
    make_model(model_dir, layers, dry_run)
    rows = []
    for case in cases.split(","):
        for cap in (float(c) for c in caps.split(",")):
            rows.append(_child(sys.argv[1:], case, cap, out))
            LOG.info("%s", rows[-1])
    print(table(rows, layers))
    shutil.rmtree(model_dir, ignore_errors=True)
    if any("error" in r or not r["inspect"] for r in rows):
        sys.exit(1)


def _child(argv: list[str], case: str, cap: float, out: Path) -> dict:
    """Run one case in a fresh process; inspect its store, then delete it."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, *argv, "--child", f"{case}:{cap:g}"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    found = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not found:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return {"case": case, "cap": cap, "error": tail[:160]}
    row = json.loads(found[-1].removeprefix("RESULT "))
    row["inspect"] = inspect_ok(out)
    shutil.rmtree(out, ignore_errors=True)
    return row


if __name__ == "__main__":
    main()
