"""Data-parallel estimation: two CPU processes (torchrun, gloo) reproduce the single-process store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import save_tiny_model

from mergekit_fisher.estimate import estimate_fisher
from mergekit_fisher.store import open_store

torch.set_num_threads(1)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "1 + 2 = 3",
    "hello world, how are you today?",
    "short one",
    "a b c d e f g h i j",
    "numbers 12345 and more 678",
    "question? answer!",
]


def test_two_processes_reproduce_the_single_process_store(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "m", seed=4)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    options = ["--mode", "sampled", "--samples-per-example", "2", "--batch-size", "2"]
    options += ["--dtype", "float64", "--store-dtype", "float32", "--seed", "9", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mergekit_fisher.cli", "estimate", str(model), "--data", str(data),
        "--out", str(tmp_path / "dist"), *options,
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.count("wrote") == 1  # rank 0 writes; rank 1 stays quiet
    dist = open_store(tmp_path / "dist")
    single = estimate_fisher(
        model,
        data,
        tmp_path / "single",
        mode="sampled",
        samples_per_example=2,
        batch_size=3,
        dtype="float64",
        store_dtype="float32",
        seed=9,
        progress=False,
    )
    est_d, est_s = dist.config["estimator"], single.config["estimator"]
    assert est_d["world_size"] == 2 and est_s["world_size"] == 1
    for key in ("num_sequences", "num_tokens", "data_fingerprint"):
        assert est_d[key] == est_s[key]
    assert dist.names == single.names
    for name in single.names:
        a, b = dist.get(name, dtype=torch.float64), single.get(name, dtype=torch.float64)
        assert (a - b).abs().max() <= 1e-6 * b.abs().max(), name
