#!/usr/bin/env python
"""Merge benchmark: mergekit's ``linear`` vs our ``fisher`` (and ``regmean``) on the same models.

Writes synthetic Llama-shaped models (random weights, sharded safetensors + ``config.json``)
and full-size Fisher stores bound to them (``bench_models.py``), then runs the methods through
mergekit's real pipeline (``run_merge``), each merge in a fresh child process, interleaved and
repeated. For each method it prints the merge wall time, CPU time, bytes read and peak RSS,
then the method/linear ratios with PASS/FAIL against the goals (fisher: wall <= 2.2x, peak RSS
<= 1.5x, bytes read <= 2x; regmean: wall <= 3x).

    python scripts/bench_merge.py                       # ~0.5B parameters, bf16, 2 models
    python scripts/bench_merge.py --params 0.1B --repeats 5 --json results.json
    python scripts/bench_merge.py --workdir /tmp/bench --keep     # then --reuse next time
    python scripts/bench_merge.py --methods linear,regmean        # + synthetic Gram stores

``--methods`` with ``regmean`` also writes one float32 Gram store per model (``gram_M``, added
to a reused workdir on first use): a random SPD matrix per distinct layer input, shared the way
the estimator shares them (q/k/v, gate/up).

Peak RSS is the child's ``VmHWM`` (anonymous + file-backed: safetensors memory-maps its
inputs, so pages it has read count until the file is closed). A sampler thread also records
the peaks of ``RssAnon`` and ``RssFile`` separately. ``rchar``/``read_bytes`` come from
``/proc/self/io`` and do not count reads through a memory map, which is how safetensors reads
both the models and the stores: the logical bytes (the sizes of the input files, all of
which the merge reads) are the meaningful figure.

On a machine shared with other jobs, pass ``--threads 1``: with several torch threads a busy
neighbour core makes runs flip between fast and 3-4x slower ones. ``--fisher-kernel
FILE.py:FUNCTION`` runs ``fisher`` with a prototype kernel, to measure a change to
``methods/fisher.py`` before making it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_models import PRESETS, input_files, prepare_workdir, tensor_shapes

GOAL_WALL = 2.2
GOAL_RSS = 1.5
GOAL_BYTES = 2.0
GOALS: dict[str, dict[str, float]] = {
    "fisher": {"wall": GOAL_WALL, "peak_rss": GOAL_RSS, "bytes_read": GOAL_BYTES},
    "regmean": {"wall": 3.0},
}
"""Per method, the goals of its ratios to ``linear`` (a missing key has none)."""
METHODS = ("linear", "fisher")
"""The default ``--methods``."""
STORE_OF = {"fisher": ("fisher", "fisher"), "regmean": ("gram", "gram")}
"""Per method, its recipe parameter and the prefix of its store directories."""
RESULT_MARK = "@@BENCH_RESULT@@"

# --------------------------------------------------------------------------- child process


def _proc_status() -> dict[str, int]:
    """Memory lines of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _proc_io() -> dict[str, int]:
    try:
        with open("/proc/self/io") as fh:
            return {k: int(v) for k, _, v in (line.partition(": ") for line in fh)}
    except OSError:
        return {}


class PeakSampler:
    """Polls /proc/self/status to find the peaks of RssAnon and RssFile (VmHWM sums both)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak: dict[str, int] = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            status = _proc_status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], status.get(key, 0))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def recipe(job: dict[str, Any]) -> dict[str, Any]:
    """The mergekit recipe of one job (same models, weights and dtype for both methods)."""
    models = []
    for k, model in enumerate(job["models"]):
        parameters: dict[str, Any] = {"weight": 1.0}
        if job["method"] in STORE_OF:
            parameters[STORE_OF[job["method"]][0]] = job["stores"][k]
        models.append({"model": model, "parameters": parameters})
    config: dict[str, Any] = {
        "merge_method": job["method"],
        "models": models,
        "dtype": job["dtype"],
    }
    if job.get("out_dtype"):
        config["out_dtype"] = job["out_dtype"]
    return config


def _swap_fisher_kernel(spec: str) -> None:
    """Replace the registered ``fisher`` kernel by ``FILE.py:FUNCTION`` (to A/B a prototype)."""
    import importlib.util

    from mergekit_fisher.methods.fisher import FISHER

    path, _, function = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("bench_fisher_kernel", path)
    if module_spec is None or module_spec.loader is None:
        raise SystemExit(f"--fisher-kernel: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    FISHER.implementation = getattr(module, function)  # type: ignore[attr-defined]


def child_main(job: dict[str, Any]) -> None:
    """Run one merge and print its measurements as one JSON line."""
    import resource

    t0 = time.perf_counter()
    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    import mergekit_fisher.methods  # noqa: F401  (registers `fisher`, as the .pth hook would)

    if job.get("fisher_kernel"):
        _swap_fisher_kernel(job["fisher_kernel"])
    import_s = time.perf_counter() - t0
    options: dict[str, Any] = {
        "copy_tokenizer": False,
        "quiet": True,
        "write_model_card": False,
        "cuda": job["cuda"],
    }
    if job["out_shard_size"] is not None:
        options["out_shard_size"] = job["out_shard_size"]
    if job["threads"] is not None:
        options["num_threads"] = job["threads"]
    merge_options = MergeOptions(**options)
    merge_options.apply_global_options()  # as mergekit-yaml does (run_merge does not): threads
    config = MergeConfiguration.model_validate(recipe(job))
    profiler = None
    if job.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    io0 = _proc_io()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    with PeakSampler() as sampler:
        t1 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        mergekit.merge.run_merge(config, job["out"], options=merge_options)
        if profiler is not None:
            profiler.disable()
        merge_s = time.perf_counter() - t1
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    io1 = _proc_io()
    if profiler is not None:
        profiler.dump_stats(job["profile"])
    status = _proc_status()
    result = {
        "method": job["method"],
        "import_s": import_s,
        "merge_s": merge_s,
        "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "vmhwm": status["VmHWM"],
        "maxrss": ru1.ru_maxrss * 1024,
        "peak_anon": sampler.peak["RssAnon"],
        "peak_file": sampler.peak["RssFile"],
        "rchar": io1.get("rchar", 0) - io0.get("rchar", 0),
        "read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
    }
    print(RESULT_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (clean pages only; best effort, no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prefetch(paths: list[Path]) -> None:
    """Read the files once so that every run starts from the same warm page cache."""
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """One merge in a fresh interpreter; returns its measurements plus the total child wall."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{job['method']} merge failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    result["child_s"] = wall
    return result


def schedule(
    repeats: int, warmup: int, methods: tuple[str, ...] = METHODS
) -> Iterator[tuple[int, str]]:
    """Warm-up runs (repeat < 0), then interleaved ABBA order (linear, fisher, fisher, ...)."""
    for r in range(-warmup, 0):
        for method in methods:
            yield r, method
    for r in range(repeats):
        order = methods if r % 2 == 0 else methods[::-1]
        for method in order:
            yield r, method


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and library versions, for the record."""
    import platform
    from importlib.metadata import version

    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mergekit": version("mergekit"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(
                ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")
            )
        with open("/proc/meminfo") as fh:
            info["mem_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def summarize(
    runs: list[dict[str, Any]], logical: dict[str, int], methods: tuple[str, ...] = METHODS
) -> dict[str, Any]:
    """Medians/mins per method, each method's ratios to ``linear`` and the verdicts."""
    per: dict[str, dict[str, Any]] = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return float(statistics.median(r[key] for r in rs))

        per[method] = {
            "merge_s_median": med("merge_s"),
            "merge_s_min": min(r["merge_s"] for r in rs),
            "child_s_median": med("child_s"),
            "cpu_s_median": med("cpu_s"),
            "vmhwm_median": med("vmhwm"),
            "vmhwm_max": max(r["vmhwm"] for r in rs),
            "peak_anon_median": med("peak_anon"),
            "peak_file_median": med("peak_file"),
            "logical_read": logical[method],
            "rchar_median": med("rchar"),
            "read_bytes_median": med("read_bytes"),
        }
    lin = per["linear"]
    ratios: dict[str, dict[str, Any]] = {}
    verdict: dict[str, dict[str, bool]] = {}
    for method in methods[1:]:
        fis = per[method]
        paired = [
            f["merge_s"] / lo["merge_s"]
            for lo, f in zip(
                [r for r in runs if r["method"] == "linear"],
                [r for r in runs if r["method"] == method],
            )
        ]
        ratios[method] = {
            "wall_median": fis["merge_s_median"] / lin["merge_s_median"],
            "wall_min": fis["merge_s_min"] / lin["merge_s_min"],
            "wall_paired": paired,
            "cpu_median": fis["cpu_s_median"] / lin["cpu_s_median"],
            "peak_rss": fis["vmhwm_median"] / lin["vmhwm_median"],
            "peak_anon": fis["peak_anon_median"] / max(lin["peak_anon_median"], 1),
            "bytes_read": fis["logical_read"] / lin["logical_read"],
        }
        key_of = {"wall": "wall_median", "peak_rss": "peak_rss", "bytes_read": "bytes_read"}
        verdict[method] = {
            goal: ratios[method][key_of[goal]] <= limit
            for goal, limit in GOALS.get(method, {}).items()
        }
    return {"methods": per, "ratios": ratios, "pass": verdict}


def report(summary: dict[str, Any]) -> str:
    """A Markdown table of the summary (also what docs/benchmarks.md records)."""
    rows = [
        ("merge wall, median (s)", lambda m: f"{m['merge_s_median']:.2f}"),
        ("merge wall, min (s)", lambda m: f"{m['merge_s_min']:.2f}"),
        ("child wall incl. imports, median (s)", lambda m: f"{m['child_s_median']:.2f}"),
        ("merge CPU time, median (s)", lambda m: f"{m['cpu_s_median']:.2f}"),
        ("peak RSS (VmHWM), median (GiB)", lambda m: _gib(m["vmhwm_median"])),
        ("  peak RssAnon (GiB)", lambda m: _gib(m["peak_anon_median"])),
        ("  peak RssFile (GiB)", lambda m: _gib(m["peak_file_median"])),
        ("logical bytes read (GiB)", lambda m: _gib(m["logical_read"])),
        ("/proc rchar (GiB)", lambda m: _gib(m["rchar_median"])),
        ("/proc read_bytes (GiB)", lambda m: _gib(m["read_bytes_median"])),
    ]
    per = summary["methods"]
    methods = list(per)
    lines = ["| | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    lines += [
        f"| {label} | " + " | ".join(fmt(per[m]) for m in methods) + " |" for label, fmt in rows
    ]

    def goal(method: str, key: str, text: str) -> str:
        limit = GOALS.get(method, {}).get(key)
        if limit is None:
            return f"| {text} | | |"
        passed = summary["pass"][method][key]
        return f"| {text} | <= {limit}x | {'PASS' if passed else 'FAIL'} |"

    for method, ratios in summary["ratios"].items():
        paired = ", ".join(f"{x:.2f}" for x in ratios["wall_paired"])
        lines += [
            "",
            f"| {method} / linear | ratio | goal | |",
            "|---|---:|---:|---|",
            goal(method, "wall", f"merge wall (median) | {ratios['wall_median']:.2f}x"),
            f"| merge wall (min; per repeat: {paired}) | {ratios['wall_min']:.2f}x | | |",
            f"| merge CPU time (median) | {ratios['cpu_median']:.2f}x | | |",
            goal(method, "peak_rss", f"peak RSS (VmHWM, median) | {ratios['peak_rss']:.2f}x"),
            f"| peak RssAnon (median) | {ratios['peak_anon']:.2f}x | | |",
            goal(method, "bytes_read", f"logical bytes read | {ratios['bytes_read']:.2f}x"),
        ]
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """``5B``/``500M``/``64K`` or a plain number, in bytes (mergekit's spelling)."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", choices=sorted(PRESETS), default="0.5B", help="size preset")
    p.add_argument("--hidden", type=int, help="hidden size (overrides the preset)")
    p.add_argument("--layers", type=int, help="number of layers (overrides the preset)")
    p.add_argument("--intermediate", type=int, help="MLP width (overrides the preset)")
    p.add_argument("--vocab", type=int, help="vocabulary size (overrides the preset)")
    p.add_argument("--heads", type=int, help="attention heads (overrides the preset)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated, linear first (default linear,fisher; also: regmean)",
    )
    p.add_argument("--models", type=int, default=2, help="models merged (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and Fishers")
    p.add_argument("--workdir", type=Path, help="where inputs go (default: a temp dir in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the workdir at the end")
    p.add_argument("--reuse", action="store_true", help="reuse matching inputs in --workdir")
    p.add_argument("--repeats", type=int, default=3, help="runs per method (default 3)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per method first (default 1)"
    )
    p.add_argument("--dtype", default="bfloat16", help="recipe dtype (default bfloat16)")
    p.add_argument("--out-dtype", help="recipe out_dtype (default: none)")
    p.add_argument(
        "--out-shard-size", type=parse_size, help="mergekit --out-shard-size (default mergekit's)"
    )
    p.add_argument(
        "--model-shard-size",
        type=parse_size,
        default=parse_size("5B"),
        help="shard size of the synthetic models (default 5B bytes)",
    )
    p.add_argument(
        "--store-shard-size",
        type=parse_size,
        default=5 * 1024**3,
        help="shard size of the Fisher stores (default write_store's, 5 GiB)",
    )
    p.add_argument("--threads", type=int, help="torch threads in the merge (mergekit option)")
    p.add_argument("--cuda", action="store_true", help="merge on the GPU (mergekit --cuda)")
    p.add_argument(
        "--cold", action="store_true", help="evict the inputs from the page cache before each run"
    )
    p.add_argument(
        "--fisher-kernel",
        metavar="FILE.py:FUNCTION",
        help="run `fisher` with this kernel instead of methods/fisher.py's (to measure a prototype)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        help="cProfile the first fisher run (the warm-up one, by default) into this file",
    )
    p.add_argument("--json", type=Path, help="also write all results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    hidden, layers, intermediate, vocab, heads = PRESETS[args.params]
    args.hidden = args.hidden or hidden
    args.layers = args.layers or layers
    args.intermediate = args.intermediate or intermediate
    args.vocab = args.vocab or vocab
    args.heads = args.heads or heads
    args.kv_heads = args.kv_heads or args.heads
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if (
        len(args.methods) < 2
        or args.methods[0] != "linear"
        or len(set(args.methods)) != len(args.methods)
        or any(m not in STORE_OF for m in args.methods[1:])
    ):
        p.error(f"--methods: linear first, then one or more of {sorted(STORE_OF)}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    return args


def plan_inputs(
    workdir: Path, args: argparse.Namespace
) -> tuple[list[str], dict[str, list[str]], dict[str, int], list[Path]]:
    """(model dirs, store dirs per method, logical bytes each method reads, every input file)."""
    models = [str(workdir / f"model_{m}") for m in range(args.models)]
    stores = {
        method: [str(workdir / f"{STORE_OF[method][1]}_{m}") for m in range(args.models)]
        for method in args.methods[1:]
    }
    files = {"linear": [f for m in models for f in input_files(Path(m))]}
    for method, dirs in stores.items():
        files[method] = files["linear"] + [f for d in dirs for f in input_files(Path(d))]
    logical = {k: sum(f.stat().st_size for f in v) for k, v in files.items()}
    every_file = sorted({f for v in files.values() for f in v})
    return models, stores, logical, every_file


def run_schedule(
    args: argparse.Namespace,
    workdir: Path,
    models: list[str],
    stores: dict[str, list[str]],
    every_file: list[Path],
) -> list[dict[str, Any]]:
    """Every warm-up and timed merge, interleaved; returns the timed runs' measurements."""
    runs: list[dict[str, Any]] = []
    profile_left = args.profile is not None
    for r, method in schedule(args.repeats, args.warmup, args.methods):
        out = workdir / f"out_{method}"
        shutil.rmtree(out, ignore_errors=True)
        if args.cold:
            evict(every_file)
        job = {
            "method": method,
            "models": models,
            "stores": stores.get(method, []),
            "out": str(out),
            "dtype": args.dtype,
            "out_dtype": args.out_dtype,
            "out_shard_size": args.out_shard_size,
            "threads": args.threads,
            "cuda": args.cuda,
            "profile": None,
            "fisher_kernel": args.fisher_kernel if method == "fisher" else None,
        }
        if method == "fisher" and profile_left:
            job["profile"] = str(args.profile.resolve())
            profile_left = False
        result = run_child(job)
        result["repeat"] = r
        shutil.rmtree(out, ignore_errors=True)
        if r >= 0:
            runs.append(result)
        tag = "warm-up" if r < 0 else f"{r + 1}/{args.repeats}"
        print(
            f"  [{tag}] {method:6s} merge {result['merge_s']:7.2f} s  "
            f"cpu {result['cpu_s']:7.2f} s  VmHWM {_gib(result['vmhwm'])} GiB  "
            f"(anon {_gib(result['peak_anon'])}, file {_gib(result['peak_file'])})",
            flush=True,
        )
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return
    n_params = sum(math.prod(s) for s in tensor_shapes(args).values())
    print(
        f"synthetic Llama: {n_params / 1e9:.3f}B parameters (hidden {args.hidden}, layers "
        f"{args.layers}, intermediate {args.intermediate}, vocab {args.vocab}), "
        f"{args.models} models, bf16; {args.repeats} repeats per method",
        flush=True,
    )
    host = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in host.items()), flush=True)
    temporary = args.workdir is None
    workdir = (
        Path(tempfile.mkdtemp(prefix="bench_merge.", dir="/tmp")) if temporary else args.workdir
    )
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        prepare_workdir(workdir, args)
        print(f"inputs ready in {time.perf_counter() - t0:.1f} s", flush=True)
        models, stores, logical, every_file = plan_inputs(workdir, args)
        if not args.cold:
            prefetch(every_file)
        runs = run_schedule(args, workdir, models, stores, every_file)
        summary = summarize(runs, logical, args.methods)
        print()
        print(report(summary))
        if args.json is not None:
            payload = {
                "params": n_params,
                "machine": host,
                "args": {k: str(v) for k, v in vars(args).items() if k != "child"},
                "runs": runs,
                **summary,
            }
            args.json.write_text(json.dumps(payload, indent=2))
        if args.profile is not None:
            import pstats

            print(f"\nprofile of the first fisher merge ({args.profile}):")
            pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(30)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep or not temporary:
            print(f"inputs kept in {workdir} (pass --workdir {workdir} --reuse to reuse them)")


if __name__ == "__main__":
    main()
