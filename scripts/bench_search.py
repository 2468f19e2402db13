"""Cost of ``search --methods all`` on the real-model benchmark's experts, per variant.

Reads what ``scripts/bench_quality_real.py`` left in ``--workdir`` (SmolLM2-135M-Instruct, one
expert, ``full`` Fisher and ``gram`` store and ``valid`` split per task) and runs the search as
``bench_quality_real.py``'s ``searched`` row does, once per variant, in this one process:

* ``plain``: every candidate merged in this process, then scored on every row (the anchor: the
  search as it was before racing and merging ahead);
* ``prune``: racing (``search.race``);
* ``ahead``: one worker process merging ahead (``search.ahead``);
* ``both``: the default.

Prints per variant: wall seconds, seconds a candidate, its ratio to the anchor, candidates
pruned, and the pick (every variant must pick the same)::

    python scripts/bench_search.py --workdir /tmp/real --experts 4 --variants plain,both
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mergekit_fisher.real import pipeline
from mergekit_fisher.real.smollm2 import model_dir

TASKS = ("acronym", "max", "pick", "reverse")
VARIANTS = {
    "plain": {"prune": False, "merge_workers": 0},
    "prune": {"prune": True, "merge_workers": 0},
    "ahead": {"prune": False, "merge_workers": 1},
    "both": {"prune": True, "merge_workers": 1},
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/real"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experts", type=int, choices=(2, 4), default=4)
    parser.add_argument("--variants", default="plain,both", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the scorer")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    root, tasks = args.workdir / f"seed{args.seed}", TASKS[: args.experts]
    inputs = pipeline.search_inputs(
        model_dir(args.workdir / "cache"),
        [root / f"expert-{t}" for t in tasks],
        [root / f"store-{t}-full" for t in tasks],
        [root / f"store-{t}-gram" for t in tasks],
    )
    valid = [root / "data" / f"{t}-valid.jsonl" for t in tasks]
    anchor = None
    for name in args.variants.split(","):
        started = time.perf_counter()
        result = pipeline.search_methods(inputs, valid, methods=args.methods, **VARIANTS[name])
        wall = time.perf_counter() - started
        each = wall / len(result.candidates)
        anchor = anchor or (each if name == "plain" else None)
        ratio = f"{each / anchor:.2f}x plain" if anchor else "-"
        pruned = sum(c.pruned for c in result.candidates)
        print(
            f"{name:>6}: {wall:7.1f} s wall, {each:5.1f} s a candidate ({ratio}), "
            f"{pruned}/{len(result.candidates)} pruned, picked {result.best.label()} "
            f"(objective {result.best.loss:.4f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
