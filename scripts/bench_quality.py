#!/usr/bin/env python
"""The demo's experiment, scaled up by flags (model size, steps, data, seeds, device).

It reuses ``mergekit_fisher.demo`` as is: same tasks, same pipeline (public ``estimate_fisher``,
``search``, mergekit's ``run_merge``), same merge rows, evaluation and tables, in both regimes
by default (``close``: experts a short fine-tune from the base; ``forget``: experts trained
until each forgets the other task). Only the sizes change. Record runs in docs/benchmarks.md
with the exact command and device. Example (one GPU):

    python scripts/bench_quality.py --device cuda --hidden 256 --layers 4 --heads 8 \
        --kv-heads 4 --base-steps 2000 --close-steps 300 --forget-steps 3000 \
        --eval-size 2000 --calib-size 2048 --seeds 5 --out bench-quality-out
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mergekit_fisher.demo.run import DemoSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags for every size that the demo fixes; defaults are the demo's own."""
    from mergekit_fisher.demo.run import DemoSettings

    d = DemoSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench-quality-out", help="output directory")
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--first-seed", type=int, default=d.first_seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: default)")
    p.add_argument("--workers", type=int, default=d.workers, help="seeds run side by side")
    p.add_argument("--hidden", type=int, default=d.size.hidden)
    p.add_argument("--layers", type=int, default=d.size.layers)
    p.add_argument("--heads", type=int, default=d.size.heads)
    p.add_argument("--kv-heads", type=int, default=d.size.kv_heads)
    p.add_argument("--intermediate", type=int, default=None, help="default: 4 x hidden")
    p.add_argument("--base-steps", type=int, default=d.base.steps)
    p.add_argument("--base-lr", type=float, default=d.base.lr)
    p.add_argument(
        "--regime", default="both", choices=("close", "forget", "both"), help="which regimes"
    )
    p.add_argument("--close-steps", type=int, default=d.close.steps, help="close experts")
    p.add_argument("--close-lr", type=float, default=d.close.lr)
    p.add_argument("--forget-steps", type=int, default=d.forget.steps, help="forget experts")
    p.add_argument("--forget-lr", type=float, default=d.forget.lr)
    p.add_argument("--batch-size", type=int, default=d.base.batch_size)
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="problems per task")
    p.add_argument("--calib-size", type=int, default=d.calib_size, help="Fisher examples")
    p.add_argument("--fisher-mode", default=d.fisher_mode, choices=("sampled", "empirical"))
    p.add_argument("--fisher-batch-size", type=int, default=d.fisher_batch_size)
    p.add_argument("--granularities", default=",".join(d.granularities), help="full,nodes")
    p.add_argument(
        "--node-mapping", default=d.node_mapping, choices=("heads", "paper"), help="nodes rows"
    )
    p.add_argument("--ties-density", type=float, default=d.ties_density)
    p.add_argument(
        "--search-weights",
        default=",".join(f"{w:g}" for w in d.search_weights),
        help="grid of the searched rows (rev expert weight, and base strength when anchored)",
    )
    p.add_argument(
        "--search-samples", type=int, default=d.search_samples, help="valid problems scored"
    )
    p.add_argument("--keep-models", action="store_true")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> DemoSettings:
    """The ``DemoSettings`` the flags describe."""
    from mergekit_fisher.demo.run import REGIMES, DemoSettings
    from mergekit_fisher.demo.train import ModelSize, TrainSettings

    size = ModelSize(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate or 4 * args.hidden,
    )
    return DemoSettings(
        seeds=args.seeds,
        first_seed=args.first_seed,
        size=size,
        base=TrainSettings(steps=args.base_steps, lr=args.base_lr, batch_size=args.batch_size),
        close=TrainSettings(steps=args.close_steps, lr=args.close_lr, batch_size=args.batch_size),
        forget=TrainSettings(
            steps=args.forget_steps, lr=args.forget_lr, batch_size=args.batch_size
        ),
        regimes=REGIMES if args.regime == "both" else (args.regime,),
        eval_size=args.eval_size,
        calib_size=args.calib_size,
        fisher_mode=args.fisher_mode,
        fisher_batch_size=args.fisher_batch_size,
        granularities=tuple(g for g in args.granularities.split(",") if g),
        node_mapping=args.node_mapping,
        ties_density=args.ties_density,
        search_weights=tuple(float(w) for w in args.search_weights.split(",") if w),
        search_samples=args.search_samples,
        device=args.device,
        threads=args.threads,
        workers=args.workers,
        keep_models=args.keep_models,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the experiment, print the tables, write report.json, chart.png and command.json."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergekit_fisher").setLevel(logging.INFO)
    from mergekit_fisher.demo.report import format_report
    from mergekit_fisher.demo.run import run_demo

    start = time.perf_counter()
    report = run_demo(args.out, settings_from(args))
    device = args.device
    if device.startswith("cuda"):
        import torch

        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    print(format_report(report))
    print(f"device: {device}; command: {' '.join(['python', *sys.argv])}")
    print(
        f"wall time: {time.perf_counter() - start:.0f} s; report: {Path(args.out) / 'report.json'}"
    )
    (Path(args.out) / "command.json").write_text(
        json.dumps({"argv": sys.argv, "device": device}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
