"""Atomic checkpoints of a run's accumulators, so ``--resume`` continues where a run stopped.

A checkpoint lives beside the store, in ``<out>.checkpoint/`` (one file per rank), and holds
the accumulators (float32, on CPU), the position in this rank's example order, the counts, and
a hash of everything the result depends on. Labels are drawn from seeds derived per example
(engine.example_seed), so no RNG state is needed: a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mergekit_fisher.estimate.config import EstimateError

VERSION = 1


def checkpoint_dir(out: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(out).rstrip('/')}.checkpoint")


def _file(directory: Path, rank: int, world: int) -> Path:
    return directory / f"state-rank{rank:03d}-of-{world:03d}.pt"


def save(directory: Path, rank: int, world: int, state: dict[str, Any]) -> Path:
    """Write ``state`` to a temporary file and rename it over the previous checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    target = _file(directory, rank, world)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    payload = dict(state, version=VERSION)
    payload["accumulators"] = {k: v.detach().cpu() for k, v in state["accumulators"].items()}
    torch.save(payload, tmp)
    os.replace(tmp, target)
    return target


def exists(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob("state-rank*.pt"))


def load(directory: Path, rank: int, world: int, expected_hash: str) -> dict[str, Any]:
    """This rank's checkpoint; refuses one written by a different run or world size."""
    target = _file(directory, rank, world)
    if not target.exists():
        found = sorted(p.name for p in directory.glob("state-rank*.pt"))
        raise EstimateError(
            f"{directory} has no checkpoint for rank {rank} of {world} (found {found[:4]}): "
            "resume with the same number of processes, or delete the directory to start over"
        )
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as error:
        raise EstimateError(
            f"{target} is unreadable ({type(error).__name__}): delete {directory} to start over"
        ) from None
    if state.get("version") != VERSION or state.get("hash") != expected_hash:
        raise EstimateError(
            f"{target} belongs to a run with other settings (model, data, mode, granularity, "
            f"seed, dtype, max length or draws differ): use the same settings to --resume, "
            f"or delete {directory} to start over"
        )
    return state


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
