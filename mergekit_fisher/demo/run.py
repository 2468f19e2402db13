"""The offline demo: does Fisher merging merge better than averaging?

Per seed, on CPU in about a minute (docs/demo.md has the numbers and the reasons):

1. build a tiny Llama (``ModelSize``) and train a shared base on an even mixture of the two
   tasks in ``tasks`` (``add``: 2-digit addition; ``rev``: reversing 3-8 letters) for
   ``base.steps`` steps;
2. fine-tune one expert per task from that base (``expert.steps`` steps on its task only);
3. estimate each expert's Fisher with the public ``estimate_fisher`` API on ``calib_size``
   prompt/completion examples of its own task's train split (``full``, and ``nodes`` when the
   estimator supports it);
4. merge the experts through mergekit's own ``run_merge`` (what ``mergekit-yaml`` runs) with
   ``linear``, ``task_arithmetic``, ``ties`` and ``fisher``;
5. evaluate base, experts and merges on ``eval_size`` held-out problems per task (greedy
   exact match and completion loss).

Every setting below was fixed before any merge was evaluated, from training curves and the
``valid`` split only; the evaluation split is never used to choose anything. The verdict
reports the best merge and its margin over ``linear`` whatever the outcome.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_fisher.demo.evaluate import TaskScore, evaluate
from mergekit_fisher.demo.tasks import TASKS, Problem, make_tokenizer, sample_problems, write_jsonl
from mergekit_fisher.demo.train import ModelSize, TrainSettings, build_model, train

__all__ = [
    "MERGES",
    "DemoSettings",
    "format_table",
    "model_rows",
    "run_demo",
]

logger = logging.getLogger(__name__)

MERGES = ("linear", "task_arithmetic", "ties", "fisher (full)", "fisher (nodes)")
"""Merge rows, in table order; ``fisher (nodes)`` is dropped when the estimator lacks nodes."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything that shapes a run. The defaults are the documented demo (docs/demo.md).

    ``threads`` is torch's intra-op thread count for the run (0: leave torch's default). One
    thread is the default because a 64-wide model gains little from a second one, and on a
    busy 2-core machine two spinning OpenMP threads made training ten times slower (measured).
    """

    seeds: int = 3
    first_seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    base: TrainSettings = field(default_factory=lambda: TrainSettings(steps=300, lr=3e-3))
    expert: TrainSettings = field(default_factory=lambda: TrainSettings(steps=500, lr=1e-3))
    eval_size: int = 500
    calib_size: int = 256
    fisher_mode: str = "sampled"
    fisher_batch_size: int = 32
    granularities: tuple[str, ...] = ("full", "nodes")
    ties_density: float = 0.5
    device: str = "cpu"
    threads: int = 1
    keep_models: bool = False


def model_rows(granularities: Sequence[str] = ("full", "nodes")) -> list[str]:
    """Table rows: base, one expert per task, then every merge."""
    merges = [m for m in MERGES if not m.startswith("fisher (") or m[8:-1] in granularities]
    return ["base", *(f"expert {t.name}" for t in TASKS), *merges]


# --------------------------------------------------------------------------------------------
# Saving, estimating, merging


def _save(model: torch.nn.Module, path: Path) -> Path:
    """Save a model with the demo tokenizer (float32 safetensors) and return its absolute path."""
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path.resolve()


def _load(path: Path, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def _estimate(
    model: Path, data: Path, out: Path, granularity: str, settings: DemoSettings, seed: int
) -> Path:
    """The expert's Fisher store, through the public API (what ``mergekit-fisher estimate`` runs)."""
    from mergekit_fisher import estimate_fisher

    estimate_fisher(
        model=str(model),
        data=[str(data)],
        out=str(out),
        mode=settings.fisher_mode,
        granularity=granularity,
        num_samples=settings.calib_size,
        max_length=settings.size.max_positions,
        batch_size=settings.fisher_batch_size,
        seed=seed,
        device=settings.device,
        overwrite=True,
        progress=False,
    )
    return out.resolve()


def recipe(
    method: str,
    base: Path,
    experts: Sequence[Path],
    fishers: Sequence[Path] = (),
    ties_density: float = 0.5,
) -> str:
    """The YAML recipe of one merge (absolute paths: see the mergekit notes, section 4)."""
    lines = []
    if method == "linear":
        lines += ["merge_method: linear", "models:"]
        lines += [f"  - model: {e}\n    parameters: {{weight: 1.0}}" for e in experts]
    elif method in ("task_arithmetic", "ties"):
        extra = f", density: {ties_density}" if method == "ties" else ""
        lines += [f"merge_method: {method}", f"base_model: {base}", "models:"]
        lines += [f"  - model: {e}\n    parameters: {{weight: 1.0{extra}}}" for e in experts]
    elif method.startswith("fisher"):
        lines += ["merge_method: fisher", "models:"]
        lines += [
            f"  - model: {e}\n    parameters: {{weight: 1.0, fisher: {f}}}"
            for e, f in zip(experts, fishers)
        ]
        lines += ["parameters: {normalize: true}"]
    else:
        raise ValueError(f"unknown merge {method!r}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def merge(recipe_text: str, out: Path) -> list[str]:
    """Run one recipe through mergekit's ``run_merge``; returns the files it wrote."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers.utils import logging as hf_logging

    import mergekit_fisher.method  # noqa: F401  (registers `fisher` with mergekit)

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    options = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)
    # mergekit 0.1.5 passes transformers 5 a deprecated `torch_dtype`: not the user's concern.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        run_merge(config, str(out), options=options, config_source=recipe_text)
    finally:
        hf_logging.set_verbosity(verbosity)
    return sorted(p.name for p in out.iterdir())


# --------------------------------------------------------------------------------------------
# One seed


def _scores(
    model: torch.nn.Module, evals: dict[str, list[Problem]], device: str
) -> dict[str, TaskScore]:
    return {name: evaluate(model, problems, device=device) for name, problems in evals.items()}


def _nodes_unavailable(error: Exception) -> bool:
    """True when an estimator error says ``nodes`` granularity is not implemented (yet)."""
    return isinstance(error, NotImplementedError) or (
        "nodes" in str(error) and "not" in str(error) and "implemented" in str(error)
    )


def run_seed(
    seed: int, root: Path, settings: DemoSettings, granularities: list[str]
) -> dict[str, Any]:
    """Train, estimate, merge and evaluate one seed; returns its part of the report.

    ``granularities`` is updated in place when the estimator turns out not to support one.
    """
    device = settings.device
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(timings.get(stage, 0.0) + now - clock, 2)
        clock = now

    evals = {t.name: sample_problems(t, "eval", settings.eval_size, seed, "eval") for t in TASKS}
    scores: dict[str, dict[str, TaskScore]] = {}
    curves: dict[str, list[float]] = {}

    logger.info(
        "seed %d: training the base on the mixture of %s", seed, "+".join(t.name for t in TASKS)
    )
    base = build_model(settings.size, seed).to(device)
    curves["base"] = train(base, TASKS, settings.base, seed, "base", device)
    base_dir = _save(base, root / "models" / "base")
    lap("train_base")
    scores["base"] = _scores(base, evals, device)
    lap("evaluate")

    experts: list[Path] = []
    for task in TASKS:
        logger.info("seed %d: fine-tuning expert %s", seed, task.name)
        expert = copy.deepcopy(base)
        curves[f"expert {task.name}"] = train(
            expert, [task], settings.expert, seed, f"expert-{task.name}", device
        )
        experts.append(_save(expert, root / "models" / f"expert-{task.name}"))
        lap("train_experts")
        scores[f"expert {task.name}"] = _scores(expert, evals, device)
        lap("evaluate")
        del expert
    del base

    fishers: dict[str, list[Path]] = {}
    for granularity in list(granularities):
        stores: list[Path] = []
        try:
            for task, expert_dir in zip(TASKS, experts):
                logger.info(
                    "seed %d: estimating %s Fisher of expert %s", seed, granularity, task.name
                )
                calib = sample_problems(task, "train", settings.calib_size, seed, "calibration")
                data = write_jsonl(calib, root / "data" / f"{task.name}-calibration.jsonl")
                out = root / "fishers" / f"{granularity}-{task.name}"
                stores.append(_estimate(expert_dir, data, out, granularity, settings, seed))
        except Exception as error:
            if granularity == "full" or not _nodes_unavailable(error):
                raise
            logger.warning("skipping fisher (%s): the estimator says %s", granularity, error)
            granularities.remove(granularity)
            continue
        finally:
            lap("estimate")
        fishers[granularity] = stores

    merges: dict[str, dict[str, Any]] = {}
    for row in model_rows(granularities)[1 + len(TASKS) :]:
        method = row.split(" ")[0]
        granularity = row[8:-1] if method == "fisher" else ""
        text = recipe(
            method, base_dir, experts, fishers.get(granularity, []), settings.ties_density
        )
        slug = row.replace(" (", "-").rstrip(")")
        recipe_path = root / "recipes" / f"{slug}.yml"
        recipe_path.parent.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(text)
        logger.info("seed %d: merging with %s", seed, row)
        out = root / "merges" / slug
        files = merge(text, out)
        lap("merge")
        merged = _load(out, device)
        scores[row] = _scores(merged, evals, device)
        lap("evaluate")
        del merged
        merges[row] = {"recipe": str(recipe_path), "output": str(out), "files": files}

    if not settings.keep_models:
        for sub in ("models", "fishers", "merges"):
            shutil.rmtree(root / sub, ignore_errors=True)
    return {
        "seed": seed,
        "scores": {
            row: {t: asdict(s) for t, s in by_task.items()} for row, by_task in scores.items()
        },
        "normalized_accuracy": _normalized(scores),
        "merges": merges,
        "final_train_loss": {k: round(v[-1], 5) for k, v in curves.items()},
        "timings_s": timings,
    }


def _normalized(scores: dict[str, dict[str, TaskScore]]) -> dict[str, float]:
    """Each row's accuracy on each task over that task's expert's, averaged over the tasks."""
    out = {}
    for row, by_task in scores.items():
        ratios = []
        for t in TASKS:
            expert = scores[f"expert {t.name}"][t.name].accuracy
            ratios.append(by_task[t.name].accuracy / expert if expert > 0 else 0.0)
        out[row] = sum(ratios) / len(ratios)
    return out


# --------------------------------------------------------------------------------------------
# Aggregation, verdict, table, chart


def _spread(values: Sequence[float]) -> dict[str, Any]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def summarize(per_seed: Sequence[dict[str, Any]], rows: Sequence[str]) -> dict[str, Any]:
    """Mean, sample standard deviation and per-seed values of every metric of every row."""
    summary: dict[str, Any] = {}
    for row in rows:
        metrics: dict[str, Any] = {}
        for t in TASKS:
            for metric in ("accuracy", "loss"):
                values = [s["scores"][row][t.name][metric] for s in per_seed]
                metrics[f"{metric}_{t.name}"] = _spread(values)
        metrics["normalized_accuracy"] = _spread([s["normalized_accuracy"][row] for s in per_seed])
        summary[row] = metrics
    return summary


def verdict(summary: dict[str, Any], per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Which merge has the best mean normalized accuracy, and by how much over ``linear``."""
    merges = [row for row in summary if row in MERGES]
    mean = {row: summary[row]["normalized_accuracy"]["mean"] for row in merges}
    best = max(merges, key=lambda row: mean[row])
    ranked = sorted(merges, key=lambda row: -mean[row])
    runner_up = ranked[1] if len(ranked) > 1 else best
    wins = {
        row: sum(
            s["normalized_accuracy"][row] > s["normalized_accuracy"]["linear"] for s in per_seed
        )
        for row in merges
        if row != "linear"
    }
    margin = mean[best] - mean["linear"]
    std = summary[best]["normalized_accuracy"]["std"]
    if best == "linear":
        text = (
            f"linear won: mean normalized accuracy {mean['linear']:.3f}, "
            f"{mean['linear'] - mean[runner_up]:.3f} ahead of {runner_up} ({mean[runner_up]:.3f})"
        )
    else:
        text = (
            f"{best} won: mean normalized accuracy {mean[best]:.3f} ± {std:.3f} vs linear "
            f"{mean['linear']:.3f} ({margin:+.3f}; ahead of linear in {wins[best]}/{len(per_seed)} seeds)"
        )
    fisher_rows = [r for r in merges if r.startswith("fisher")]
    for row in fisher_rows:
        if row != best:
            text += (
                f"; {row}: {mean[row]:.3f} ({mean[row] - mean['linear']:+.3f} vs linear, "
                f"ahead in {wins[row]}/{len(per_seed)} seeds)"
            )
    base = summary["base"]["normalized_accuracy"]["mean"]
    relation = "above" if mean[best] > base else "below" if mean[best] < base else "level with"
    text += f"; the unmerged base scores {base:.3f} ({best} is {relation} it)"
    return {
        "best": best,
        "best_mean": mean[best],
        "linear_mean": mean["linear"],
        "base_mean": base,
        "margin_over_linear": margin,
        "seeds_ahead_of_linear": wins,
        "ranking": ranked,
        "text": text,
    }


def format_table(report: dict[str, Any]) -> str:
    """The demo's result table (mean ± std over seeds) and its verdict, as plain text."""
    summary = report["summary"]
    names = [t["name"] for t in report["tasks"]]
    headers = ["model", *(f"acc {n}" for n in names), *(f"loss {n}" for n in names), "norm acc"]
    keys = [
        *(f"accuracy_{n}" for n in names),
        *(f"loss_{n}" for n in names),
        "normalized_accuracy",
    ]
    body = []
    for row, metrics in summary.items():
        cells = [f"{metrics[k]['mean']:.3f} ± {metrics[k]['std']:.3f}" for k in keys]
        body.append([row, *cells])
    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    seeds = len(report["seeds"])
    lines.append("")
    lines.append(
        f"mean ± std over {seeds} seed{'s' * (seeds != 1)}; norm acc = accuracy on each task / "
        "that task's expert's, averaged over the tasks"
    )
    lines.append(f"verdict: {report['verdict']['text']}")
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> Path:
    """A grouped bar chart (accuracy per task and normalized accuracy, std error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    rows = list(summary)
    names = [t["name"] for t in report["tasks"]]
    series = [(f"accuracy_{n}", f"accuracy {n}") for n in names]
    series.append(("normalized_accuracy", "normalized accuracy"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(rows)), 4.5))
    for i, (key, label) in enumerate(series):
        xs = [r + (i - (len(series) - 1) / 2) * width for r in range(len(rows))]
        means = [summary[row][key]["mean"] for row in rows]
        stds = [summary[row][key]["std"] for row in rows]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, rotation=20, ha="right")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1.15)
    seeds = len(report["seeds"])
    ax.set_title(f"mergekit-fisher demo: merging two experts ({seeds} seeds, mean ± std)")
    ax.legend(loc="upper left", ncols=len(series), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("mergekit-fisher", "mergekit", "torch", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    out["torch_threads"] = str(torch.get_num_threads())
    return out


def run_demo(
    out: Path | str = "demo-out",
    settings: DemoSettings | None = None,
    on_seed: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the whole demo into ``out``; returns the report (also written as report.json).

    ``out`` receives report.json, chart.png and, per seed, the recipes used (and the models,
    Fisher stores and merges with ``keep_models``). ``on_seed`` is called after each seed.
    """
    settings = settings or DemoSettings()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    granularities = list(settings.granularities)
    per_seed: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    try:
        for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
            t0 = time.perf_counter()
            result = run_seed(seed, out / f"seed-{seed}", settings, granularities)
            result["wall_time_s"] = round(time.perf_counter() - t0, 2)
            logger.info("seed %d done in %.0f s", seed, result["wall_time_s"])
            per_seed.append(result)
            if on_seed is not None:
                on_seed(result)
        versions = _versions()
    finally:
        torch.set_num_threads(threads)
    # A granularity dropped mid-run leaves earlier seeds with rows later ones lack: keep the
    # rows every seed has.
    rows = [r for r in model_rows(granularities) if all(r in s["scores"] for s in per_seed)]
    summary = summarize(per_seed, rows)
    skipped = [
        f"fisher ({g}): the estimator does not implement it"
        for g in settings.granularities
        if g not in granularities
    ]
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "tasks": [{"name": t.name, "description": t.description} for t in TASKS],
        "rows": rows,
        "seeds": per_seed,
        "summary": summary,
        "skipped": skipped,
        "versions": versions,
    }
    report["verdict"] = verdict(summary, per_seed)
    report["wall_time_s"] = round(time.perf_counter() - start, 2)
    report["chart"] = str(chart(report, out / "chart.png"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
