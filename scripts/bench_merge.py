#!/usr/bin/env python
"""Merge benchmark: mergekit's ``linear`` against the plugin's methods, on the same models.

Synthetic Llama-shaped models (random bf16 weights) and stores bound to them (``bench_models.py``:
cached per shape and seed under ``--workdir``, generated on the GPU under ``--cuda``, else on
every CPU core) are merged through mergekit's real pipeline (``run_merge``), interleaved and
repeated. Per method: merge wall, CPU time, peak RSS, peak GPU memory (``max_memory_allocated``
in the process that merges, reset before each merge) and bytes read, then the ratios to
``linear`` with PASS/FAIL against the goals (on CPU: fisher wall <= 2.2x, RSS <= 1.5x, bytes
<= 2x, regmean wall <= 3x; on GPU, issue 21's: fisher wall <= 1.3x and CPU time <= 2x, regmean
wall <= 2x, every method's peak RSS <= linear's and peak GPU memory <= linear's + 4x the largest
tensor in float32). The task-vector methods (fisher_arithmetic, fisher_ties) merge model_1.. as
experts of model_0 (the base).

    python scripts/bench_merge.py                                    # 0.5B, bf16, 2 models, CPU
    python scripts/bench_merge.py --cuda --preset 3b --repeats 1 --warmup 0 --processes one \\
        --methods linear,fisher,fisher_arithmetic,fisher_ties \\
        --variants "default;read_to_gpu,low_cpu_memory"              # Llama-3.2-3B shape, GPU
    python scripts/bench_merge.py --cuda --preset 8b --layers 4 --methods linear,regmean
    python scripts/bench_merge.py --cuda --preset 8b --granularity nodes   # node stores
    python scripts/bench_merge.py --preset 3b --dry-run              # the plan and disk needs

``--variants`` runs every method under each set of mergekit options (``;`` between sets, ``,``
within one; ``default`` is none), e.g. ``read_to_gpu,low_cpu_memory,async_write``. Ratios are
taken within a variant. ``--processes one`` runs every merge in one child process (one import
of mergekit, ~20 s on a fresh GPU machine, instead of one per merge); peak RSS is then reset
before each merge through ``/proc/self/clear_refs`` where the kernel allows it, else taken from a
10 ms sampler of VmRSS. ``--processes per-merge`` (the default) gives each merge a fresh
interpreter, the cleanest RSS figure.

Peak RSS is ``VmHWM`` (anonymous + file-backed: safetensors memory-maps its inputs, so pages it
has read count until the file is closed); the sampler also records the peaks of ``RssAnon`` and
``RssFile``. ``rchar``/``read_bytes`` from ``/proc/self/io`` do not count reads through a memory
map, which is how safetensors reads: the logical bytes (the input files' sizes, all of which a
merge reads) are the meaningful figure. On a machine shared with other jobs pass ``--threads 1``.
``--fisher-kernel FILE.py:FUNCTION`` runs ``fisher`` with a prototype kernel.
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench_models import PRESETS, disk_bytes, input_dir, input_files, prepare_inputs, tensor_shapes

STORE_OF = {
    "fisher": ("fisher", "fisher"),
    "regmean": ("gram", "gram"),
    "fisher_arithmetic": ("fisher", "fisher"),
    "fisher_ties": ("fisher", "fisher"),
}
"""Per method of the plugin, its recipe parameter and the prefix of its store directories."""
TASK_METHODS = ("fisher_arithmetic", "fisher_ties")
"""Methods that merge the other models as task vectors of model_0."""
METHODS = ("linear", "fisher")
"""The default ``--methods``."""
MERGEKIT_FLAGS = (
    "read_to_gpu",
    "low_cpu_memory",
    "async_write",
    "lazy_unpickle",
    "multi_gpu",
    "clone_tensors",
)
"""mergekit 0.1.5 options (``MergeOptions`` booleans) a ``--variants`` set may switch on."""
GOALS_CPU: dict[str, dict[str, float]] = {
    "fisher": {"wall": 2.2, "peak_rss": 1.5, "bytes_read": 2.0},
    "regmean": {"wall": 3.0},
}
_MEMORY = {"peak_rss": 1.0, "gpu_extra": 1.0}
GOALS_GPU: dict[str, dict[str, float]] = {
    "fisher": {"wall": 1.3, "cpu": 2.0, **_MEMORY},
    "regmean": {"wall": 2.0, **_MEMORY},
    "fisher_arithmetic": _MEMORY,
    "fisher_ties": _MEMORY,
}
"""Issue 21's goals on one GPU; ``gpu_extra`` is (peak GPU memory - linear's) over 4x the
largest tensor in float32."""
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


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0; not every sandbox allows it)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


class PeakSampler:
    """Polls /proc/self/status for the peaks of VmRSS, RssAnon and RssFile."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak: dict[str, int] = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
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
    """The mergekit recipe of one job: every model with weight 1 (and its store); for the
    task-vector methods, model_0 as ``base_model`` and the others as its experts."""
    method, models, stores = job["method"], job["models"], job["stores"]
    config: dict[str, Any] = {"merge_method": method, "dtype": job["dtype"]}
    first = 0
    if method in TASK_METHODS:
        config["base_model"] = models[0]
        first = 1
    entries = []
    for k in range(first, len(models)):
        parameters: dict[str, Any] = {"weight": 1.0}
        if method in STORE_OF:
            parameters[STORE_OF[method][0]] = stores[k]
        entries.append({"model": models[k], "parameters": parameters})
    config["models"] = entries
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


def merge_options(job: dict[str, Any]) -> Any:
    """mergekit's options for one job."""
    from mergekit.options import MergeOptions

    options: dict[str, Any] = {
        "copy_tokenizer": False,
        "quiet": True,
        "write_model_card": False,
        "cuda": job["cuda"],
        **dict.fromkeys(job["flags"], True),
    }
    if job["out_shard_size"] is not None:
        options["out_shard_size"] = job["out_shard_size"]
    if job["threads"] is not None:
        options["num_threads"] = job["threads"]
    return MergeOptions(**options)


def _forget_inputs() -> None:
    """Close what one merge left open (mergekit's loaders, our store handles, GPU cache), so the
    next merge in this process starts as a fresh one would."""
    import gc

    import torch
    from mergekit.io.tasks import LoaderCache

    from mergekit_fisher.store import clear_cache

    LoaderCache().flush_all()
    LoaderCache().loaders.clear()
    clear_cache()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_job(job: dict[str, Any], fresh: bool) -> dict[str, Any]:
    """One timed merge; ``fresh``: nothing merged in this process before (VmHWM is valid)."""
    import resource

    import mergekit.merge
    import torch
    from mergekit.config import MergeConfiguration

    options = merge_options(job)
    config = MergeConfiguration.model_validate(recipe(job))
    cuda = job["cuda"] and torch.cuda.is_available()
    hwm_valid = reset_hwm() or fresh
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    profiler = None
    if job.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    io0, ru0 = _proc_io(), resource.getrusage(resource.RUSAGE_SELF)
    with PeakSampler() as sampler, profiler or contextlib.nullcontext():
        t1 = time.perf_counter()
        mergekit.merge.run_merge(config, job["out"], options=options)
        if cuda:
            torch.cuda.synchronize()
        merge_s = time.perf_counter() - t1
    ru1, io1, status = resource.getrusage(resource.RUSAGE_SELF), _proc_io(), _proc_status()
    if profiler is not None:
        profiler.dump_stats(job["profile"])
    return {
        "method": job["method"],
        "variant": job["variant"],
        "merge_s": merge_s,
        "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "peak_rss": status["VmHWM"] if hwm_valid else sampler.peak["VmRSS"],
        "rss_source": "VmHWM" if hwm_valid else "sampled VmRSS",
        "peak_anon": sampler.peak["RssAnon"],
        "peak_file": sampler.peak["RssFile"],
        "gpu_peak": torch.cuda.max_memory_allocated() if cuda else 0,
        "rchar": io1.get("rchar", 0) - io0.get("rchar", 0),
        "read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
    }


def child_main(jobs: list[dict[str, Any]]) -> None:
    """Run the jobs in order, one JSON line of measurements each (the first after imports)."""
    t0 = time.perf_counter()
    import mergekit.merge  # noqa: F401  (timed: the import a fresh process pays)

    import mergekit_fisher.methods  # noqa: F401  (registers the methods, as the .pth hook would)

    import_s = time.perf_counter() - t0
    merge_options(jobs[0]).apply_global_options()  # threads, as mergekit-yaml does; once
    for k, job in enumerate(jobs):
        if job.get("fisher_kernel"):
            _swap_fisher_kernel(job["fisher_kernel"])
        result = run_job(job, fresh=k == 0)
        result["import_s"] = import_s if k == 0 else 0.0
        shutil.rmtree(job["out"], ignore_errors=True)
        _forget_inputs()
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


def run_child(jobs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The jobs' measurements, in order, from one fresh interpreter, as each merge ends."""
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(jobs)],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        assert proc.stdout is not None
        count = 0
        for line in proc.stdout:
            if line.startswith(RESULT_MARK):
                count += 1
                yield json.loads(line[len(RESULT_MARK) :])
        if proc.wait() != 0 or count != len(jobs):
            errors.seek(0)
            sys.stderr.write(errors.read()[-4000:])
            raise SystemExit(f"{jobs[count]['method']} merge failed (exit {proc.returncode})")


def label(method: str, variant: str) -> str:
    return method if variant == "default" else f"{method}@{variant}"


def schedule(
    repeats: int, warmup: int, methods: tuple[str, ...], variants: tuple[str, ...]
) -> Iterator[tuple[int, str, str]]:
    """(repeat, method, variant): warm-up runs (repeat < 0), then each variant's methods in
    interleaved ABBA order (linear, fisher, fisher, linear, ...)."""
    for r in range(-warmup, repeats):
        order = methods if r < 0 or r % 2 == 0 else methods[::-1]
        for variant in variants:
            for method in order:
                yield r, method, variant


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, GPU and library versions, for the record."""
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
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(
                ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")
            )
        with open("/proc/meminfo") as fh:
            info["mem_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    return info


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def per_label(runs: list[dict[str, Any]], logical: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Medians (and the min wall) of each method and variant's timed runs."""
    per: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(label(r["method"], r["variant"]) for r in runs):
        rs = [r for r in runs if label(r["method"], r["variant"]) == key]
        per[key] = {k: float(statistics.median(r[k] for r in rs)) for k in MEASURES}
        per[key]["merge_s_min"] = min(r["merge_s"] for r in rs)
        per[key]["logical_read"] = logical[rs[0]["method"]]
        per[key]["walls"] = [r["merge_s"] for r in rs]
    return per


MEASURES = (
    "merge_s",
    "cpu_s",
    "peak_rss",
    "peak_anon",
    "peak_file",
    "gpu_peak",
    "rchar",
    "read_bytes",
)


def ratios_to_linear(
    per: dict[str, dict[str, Any]], gpu_budget: float
) -> dict[str, dict[str, Any]]:
    """Each non-linear method's ratios to ``linear`` of the same variant."""
    ratios: dict[str, dict[str, Any]] = {}
    for key, m in per.items():
        method, _, variant = key.partition("@")
        if method == "linear":
            continue
        lin = per[label("linear", variant or "default")]
        ratios[key] = {
            "wall": m["merge_s"] / lin["merge_s"],
            "wall_min": m["merge_s_min"] / lin["merge_s_min"],
            "wall_paired": [a / b for a, b in zip(m["walls"], lin["walls"])],
            "cpu": m["cpu_s"] / max(lin["cpu_s"], 1e-9),
            "peak_rss": m["peak_rss"] / lin["peak_rss"],
            "peak_anon": m["peak_anon"] / max(lin["peak_anon"], 1),
            "bytes_read": m["logical_read"] / lin["logical_read"],
            "gpu_extra": (m["gpu_peak"] - lin["gpu_peak"]) / gpu_budget,
        }
    return ratios


def summarize(
    runs: list[dict[str, Any]], args: argparse.Namespace, logical: dict[str, int]
) -> dict[str, Any]:
    """Per method and variant: medians, ratios to linear and the verdicts against the goals."""
    per = per_label(runs, logical)
    budget = 4 * 4 * max(math.prod(s) for s in tensor_shapes(args).values())
    ratios = ratios_to_linear(per, budget)
    goals = GOALS_GPU if args.cuda else GOALS_CPU
    verdict = {
        key: {g: r[g] <= limit for g, limit in goals.get(key.partition("@")[0], {}).items()}
        for key, r in ratios.items()
    }
    return {"methods": per, "ratios": ratios, "pass": verdict, "gpu_budget": budget}


ROWS = (
    ("merge wall, median (s)", lambda m: f"{m['merge_s']:.2f}"),
    ("merge wall, min (s)", lambda m: f"{m['merge_s_min']:.2f}"),
    ("merge CPU time, median (s)", lambda m: f"{m['cpu_s']:.2f}"),
    ("peak RSS, median (GiB)", lambda m: _gib(m["peak_rss"])),
    ("  peak RssAnon (GiB)", lambda m: _gib(m["peak_anon"])),
    ("  peak RssFile (GiB)", lambda m: _gib(m["peak_file"])),
    ("peak GPU memory allocated (GiB)", lambda m: _gib(m["gpu_peak"])),
    ("logical bytes read (GiB)", lambda m: _gib(m["logical_read"])),
    ("/proc rchar (GiB)", lambda m: _gib(m["rchar"])),
    ("/proc read_bytes (GiB)", lambda m: _gib(m["read_bytes"])),
)
RATIO_ROWS = (
    ("wall", "merge wall (median)"),
    ("wall_min", "merge wall (min)"),
    ("cpu", "merge CPU time (median)"),
    ("peak_rss", "peak RSS (median)"),
    ("peak_anon", "peak RssAnon (median)"),
    ("bytes_read", "logical bytes read"),
    ("gpu_extra", "GPU memory over linear's / 4x largest fp32"),
)


def report(summary: dict[str, Any], cuda: bool) -> str:
    """Markdown tables of the summary (what docs/benchmarks.md records), then one ``summary:``
    line per method (what scripts/gpu_check.sh shows)."""
    per = summary["methods"]
    keys = list(per)
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {text} | " + " | ".join(fmt(per[k]) for k in keys) + " |" for text, fmt in ROWS]
    goals = GOALS_GPU if cuda else GOALS_CPU
    short = []
    for key, ratios in summary["ratios"].items():
        limits = goals.get(key.partition("@")[0], {})
        paired = ", ".join(f"{x:.2f}" for x in ratios["wall_paired"])
        lines += ["", f"| {key} / linear | ratio | goal | |", "|---|---:|---:|---|"]
        for name, text in RATIO_ROWS:
            verdict = summary["pass"][key].get(name)
            goal = "" if name not in limits else f"<= {limits[name]}x"
            mark = "" if verdict is None else ("PASS" if verdict else "FAIL")
            lines.append(f"| {text} | {ratios[name]:.2f}x | {goal} | {mark} |")
        lines.append(f"| wall per repeat | {paired} | | |")
        failed = [n for n, ok in summary["pass"][key].items() if not ok]
        short.append(
            f"summary: {key} wall {ratios['wall']:.2f}x cpu {ratios['cpu']:.2f}x "
            f"rss {ratios['peak_rss']:.2f}x gpu+ {ratios['gpu_extra']:.2f} "
            + ("PASS" if not failed else "FAIL " + ",".join(failed))
        )
    return "\n".join([*lines, "", *short])


def parse_size(text: str) -> int:
    """``5B``/``500M``/``64K`` or a plain number, in bytes (mergekit's spelling)."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def default_workdir() -> Path:
    """Where inputs are cached: $MERGEKIT_FISHER_CACHE/bench_merge, else ~/.cache/..."""
    root = os.environ.get("MERGEKIT_FISHER_CACHE") or "~/.cache/mergekit-fisher"
    return Path(root).expanduser() / "bench_merge"


def _add_shape_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", "--params", dest="preset", choices=list(PRESETS), default="0.5B",
        help="model shape (3b: Llama-3.2-3B, 8b: Llama-3.1-8B; default 0.5B)",
    )  # fmt: skip
    p.add_argument("--hidden", type=int, help="hidden size (overrides the preset)")
    p.add_argument("--layers", type=int, help="number of layers (overrides the preset)")
    p.add_argument("--intermediate", type=int, help="MLP width (overrides the preset)")
    p.add_argument("--vocab", type=int, help="vocabulary size (overrides the preset)")
    p.add_argument("--heads", type=int, help="attention heads (overrides the preset)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (overrides the preset)")
    p.add_argument("--models", type=int, default=2, help="models merged (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and stores")
    p.add_argument(
        "--granularity", choices=("full", "nodes"), default="full",
        help="Fisher stores: full-size, or one value per head and neuron (nodes)",
    )  # fmt: skip
    p.add_argument(
        "--model-shard-size", type=parse_size, default=parse_size("5B"),
        help="shard size of the synthetic models (default 5B bytes)",
    )  # fmt: skip
    p.add_argument(
        "--store-shard-size", type=parse_size, default=5 * 1024**3,
        help="shard size of the stores (default write_store's, 5 GiB)",
    )  # fmt: skip


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--methods", default=",".join(METHODS),
        help=f"comma-separated, linear first (default linear,fisher; also: {', '.join(STORE_OF)})",
    )  # fmt: skip
    p.add_argument(
        "--variants", default="default",
        help="sets of mergekit options, ';' between sets, ',' within one "
        f"(default: 'default', none; flags: {', '.join(MERGEKIT_FLAGS)})",
    )  # fmt: skip
    p.add_argument(
        "--processes", choices=("per-merge", "one"), default="per-merge",
        help="a fresh interpreter per merge (default), or one for all merges (one import)",
    )  # fmt: skip
    p.add_argument("--workdir", type=Path, default=default_workdir(), help="input cache root")
    p.add_argument("--clean", action="store_true", help="delete this spec's inputs at the end")
    p.add_argument("--dry-run", action="store_true", help="print the plan, generate nothing")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method (default 1)")
    p.add_argument("--dtype", default="bfloat16", help="recipe dtype (default bfloat16)")
    p.add_argument("--out-dtype", help="recipe out_dtype (default: none)")
    p.add_argument("--out-shard-size", type=parse_size, help="mergekit --out-shard-size")
    p.add_argument("--threads", type=int, help="torch threads in the merge (mergekit option)")
    p.add_argument("--cuda", action="store_true", help="merge on the GPU (mergekit --cuda)")
    p.add_argument("--cold", action="store_true", help="evict the inputs before each run")
    p.add_argument(
        "--fisher-kernel", metavar="FILE.py:FUNCTION",
        help="run `fisher` with this kernel instead of methods/fisher.py's",
    )  # fmt: skip
    p.add_argument("--profile", type=Path, help="cProfile the first fisher run into this file")
    p.add_argument("--json", type=Path, help="also write all results here")
    p.add_argument("--child", help=argparse.SUPPRESS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_shape_arguments(p)
    _add_run_arguments(p)
    args = p.parse_args(argv)
    preset = dict(
        zip(
            ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads"), PRESETS[args.preset]
        )
    )
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if (
        len(args.methods) < 2
        or args.methods[0] != "linear"
        or len(set(args.methods)) != len(args.methods)
        or any(m not in STORE_OF for m in args.methods[1:])
    ):
        p.error(f"--methods: linear first, then one or more of {', '.join(STORE_OF)}")
    args.variants = tuple(v.strip().replace("-", "_") for v in args.variants.split(";"))
    flags = {f for v in args.variants if v != "default" for f in v.split(",")}
    if flags - set(MERGEKIT_FLAGS) or len(set(args.variants)) != len(args.variants):
        p.error(f"--variants: distinct sets of {', '.join(MERGEKIT_FLAGS)}, or 'default'")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if any(m in args.methods for m in TASK_METHODS) and args.models < 2:
        p.error("fisher_arithmetic and fisher_ties need --models 2 or more (a base and experts)")
    return args


def plan_inputs(
    directory: Path, args: argparse.Namespace
) -> tuple[list[str], dict[str, list[str]], dict[str, int], list[Path]]:
    """(model dirs, store dirs per method, logical bytes each method reads, every input file)."""
    models = [str(directory / f"model_{m}") for m in range(args.models)]
    stores = {
        method: [str(directory / f"{STORE_OF[method][1]}_{m}") for m in range(args.models)]
        for method in args.methods[1:]
    }
    files = {"linear": [f for m in models for f in input_files(Path(m))]}
    for method, dirs in stores.items():
        first = 1 if method in TASK_METHODS else 0  # the base needs no store
        files[method] = files["linear"] + [f for d in dirs[first:] for f in input_files(Path(d))]
    logical = {k: sum(f.stat().st_size for f in v) for k, v in files.items()}
    every_file = sorted({f for v in files.values() for f in v})
    return models, stores, logical, every_file


def make_jobs(
    args: argparse.Namespace, directory: Path, models: list[str], stores: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """Every warm-up and timed merge, in schedule order."""
    jobs = []
    profile_left = args.profile is not None
    for r, method, variant in schedule(args.repeats, args.warmup, args.methods, args.variants):
        job = {
            "repeat": r,
            "method": method,
            "variant": variant,
            "flags": [] if variant == "default" else variant.split(","),
            "models": models,
            "stores": stores.get(method, []),
            "out": str(directory / f"out_{method}"),
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
        jobs.append(job)
    return jobs


def run_schedule(
    args: argparse.Namespace, jobs: list[dict[str, Any]], every_file: list[Path]
) -> list[dict[str, Any]]:
    """Run the jobs (one child each, or one for all); returns the timed runs' measurements."""
    if args.cold and args.processes == "one":
        raise SystemExit("--cold needs --processes per-merge (a child per merge)")
    batches = [jobs] if args.processes == "one" else [[job] for job in jobs]
    results = []
    for batch in batches:
        if args.cold:
            evict(every_file)
        for job, result in zip(batch, run_child(batch)):
            tag = "warm-up" if job["repeat"] < 0 else f"{job['repeat'] + 1}/{args.repeats}"
            print(
                f"  [{tag}] {label(job['method'], job['variant']):24s} merge "
                f"{result['merge_s']:7.2f} s  cpu {result['cpu_s']:7.2f} s  RSS "
                f"{_gib(result['peak_rss'])} GiB  GPU {_gib(result['gpu_peak'])} GiB"
                + (f"  (imports {result['import_s']:.1f} s)" if result["import_s"] else ""),
                flush=True,
            )
            if job["repeat"] >= 0:
                results.append(result)
    return results


def describe(args: argparse.Namespace) -> str:
    n_params = sum(math.prod(s) for s in tensor_shapes(args).values())
    need = {k: v for k, v in disk_bytes(args).items() if k in ("model", "output", *parts(args))}
    return (
        f"synthetic Llama: {n_params / 1e9:.3f}B parameters (hidden {args.hidden}, layers "
        f"{args.layers}, intermediate {args.intermediate}, vocab {args.vocab}, heads "
        f"{args.heads}/{args.kv_heads}), {args.models} models, bf16, {args.granularity} Fisher "
        "stores\ndisk (GiB): "
        + ", ".join(f"{k} {_gib(v)}" for k, v in need.items())
        + f", {_gib(sum(need.values()))} in all\ninputs: {input_dir(args)}"
    )


def parts(args: argparse.Namespace) -> tuple[str, ...]:
    """The stores the methods read: ``fisher`` and/or ``gram``."""
    return tuple(dict.fromkeys(STORE_OF[m][1] for m in args.methods[1:]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return
    print(describe(args), flush=True)
    print(f"{args.repeats} timed + {args.warmup} warm-up runs of {', '.join(args.methods)} "
          f"per variant ({'; '.join(args.variants)}), processes: {args.processes}", flush=True)  # fmt: skip
    if args.dry_run:
        return
    host = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in host.items()), flush=True)
    t0 = time.perf_counter()
    directory = prepare_inputs(args, parts(args))
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        models, stores, logical, every_file = plan_inputs(directory, args)
        if not args.cold:
            prefetch(every_file)
        jobs = make_jobs(args, directory, models, stores)
        summary = summarize(run_schedule(args, jobs, every_file), args, logical)
        print("\n" + report(summary, args.cuda))
        if args.json is not None:
            payload = {"machine": host, "args": {k: str(v) for k, v in vars(args).items()}}
            args.json.write_text(json.dumps(payload | summary, indent=2))
        if args.profile is not None:
            import pstats

            print(f"\nprofile of the first fisher merge ({args.profile}):")
            pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(30)
    finally:
        if args.clean:
            shutil.rmtree(directory, ignore_errors=True)
            print(f"deleted the inputs ({directory})")


if __name__ == "__main__":
    main()
