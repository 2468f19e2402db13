"""The offline demo: which merge method merges two experts best, and when?

Per seed, on CPU (docs/demo.md has the numbers and the reasons):

1. build a tiny Llama (``ModelSize``) and train a shared base on an even mixture of the two
   tasks in ``tasks`` (``add``: 2-digit addition; ``rev``: reversing 3-8 letters) for
   ``base.steps`` steps;
2. per *regime*, fine-tune one expert per task from that base: ``close`` (a short, gentle
   fine-tune: experts stay near the base) and ``forget`` (long enough that each expert forgets
   the other task);
3. estimate, with the public ``estimate_fisher`` API, each expert's Fisher (``full`` and
   ``nodes``) and RegMean Gram matrices on ``calib_size`` examples of its own task's train
   split, and the base's Fisher on an even mixture of the experts' calibration data;
4. merge through mergekit's own ``run_merge`` (what ``mergekit-yaml`` runs): ``linear``,
   ``task_arithmetic``, ``ties``, ``fisher`` (full, nodes), ``fisher`` anchored on the base,
   the same with coefficients chosen by ``mergekit_fisher.search`` on the ``valid`` split, and
   ``regmean``;
5. evaluate base, experts and merges on ``eval_size`` held-out problems per task (greedy
   exact match and completion loss).

Every setting below was fixed before any merge was evaluated, from training curves and the
``valid`` split only; the evaluation split is never used to choose anything (the coefficient
search scores candidates on ``valid``). The verdict reports, per regime, the best merge, its
margin over ``linear`` and where the unmerged base stands, whatever the outcome.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_fisher.demo.evaluate import TaskScore, evaluate
from mergekit_fisher.demo.tasks import TASKS, Problem, make_tokenizer, sample_problems, write_jsonl
from mergekit_fisher.demo.train import ModelSize, TrainSettings, build_model, train

__all__ = [
    "MERGES",
    "REGIMES",
    "DemoSettings",
    "MergeSpec",
    "format_table",
    "model_rows",
    "recipe",
    "run_demo",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeSpec:
    """How one merge row is made.

    ``store``: the per-expert store it reads (``full``/``nodes`` Fisher, ``gram``), or none.
    ``anchored``: the base takes part as one more Fisher-weighted input (its own store).
    ``searched``: coefficients chosen by ``mergekit_fisher.search`` on the ``valid`` split.
    """

    method: str
    store: str = ""
    anchored: bool = False
    searched: bool = False


SPECS: dict[str, MergeSpec] = {
    "linear": MergeSpec("linear"),
    "task_arithmetic": MergeSpec("task_arithmetic"),
    "ties": MergeSpec("ties"),
    "fisher (full)": MergeSpec("fisher", "full"),
    "fisher (searched)": MergeSpec("fisher", "full", searched=True),
    "fisher (nodes)": MergeSpec("fisher", "nodes"),
    "fisher+base": MergeSpec("fisher", "full", anchored=True),
    "fisher+base (searched)": MergeSpec("fisher", "full", anchored=True, searched=True),
    "regmean": MergeSpec("regmean", "gram"),
}
MERGES = tuple(SPECS)
"""Merge rows, in table order; ``fisher (nodes)`` is dropped when the estimator lacks nodes."""

REGIMES = ("close", "forget")
"""``close``: experts a short, gentle fine-tune away from the base; ``forget``: experts trained
until each has forgotten the other task."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything that shapes a run. The defaults are the documented demo (docs/demo.md).

    ``close`` and ``forget`` are the expert fine-tuning of the two regimes; ``regimes`` says
    which to run (the base is trained once per seed and shared). ``search_weights`` is the grid
    of the searched rows: the ``rev`` expert's weight (and, when anchored, the base's anchor
    strength), each over these values (the ``add`` expert's weight stays 1), scored by
    completion loss on ``search_samples`` ``valid`` problems (half per task).

    ``threads`` is torch's intra-op thread count for the run (0: leave torch's default). One
    thread is the default because a 64-wide model gains little from a second one, and on a
    busy 2-core machine two spinning OpenMP threads made training ten times slower (measured).
    """

    seeds: int = 3
    first_seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    base: TrainSettings = field(default_factory=lambda: TrainSettings(steps=300, lr=3e-3))
    close: TrainSettings = field(default_factory=lambda: TrainSettings(steps=100, lr=3e-4))
    forget: TrainSettings = field(default_factory=lambda: TrainSettings(steps=500, lr=1e-3))
    regimes: tuple[str, ...] = REGIMES
    eval_size: int = 500
    calib_size: int = 256
    fisher_mode: str = "sampled"
    fisher_batch_size: int = 32
    granularities: tuple[str, ...] = ("full", "nodes")
    node_mapping: str = "heads"
    ties_density: float = 0.5
    search_weights: tuple[float, ...] = (0.5, 1.0, 2.0)
    search_samples: int = 128
    device: str = "cpu"
    threads: int = 1
    keep_models: bool = False

    def expert_training(self, regime: str) -> TrainSettings:
        """The expert fine-tuning of ``regime``."""
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}: one of {', '.join(REGIMES)}")
        return self.close if regime == "close" else self.forget


def model_rows(granularities: Sequence[str] = ("full", "nodes")) -> list[str]:
    """Table rows: base, one expert per task, then every merge."""
    merges = [
        row
        for row, spec in SPECS.items()
        if spec.store not in ("full", "nodes") or spec.store in granularities
    ]
    return ["base", *(f"expert {t.name}" for t in TASKS), *merges]


def _slug(row: str) -> str:
    """A file name for a row: ``fisher+base (searched)`` -> ``fisher-base-searched``."""
    return row.replace("+", "-").replace(" (", "-").rstrip(")").replace(" ", "-")


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
    model: Path, data: Path, out: Path, store: str, settings: DemoSettings, seed: int
) -> Path:
    """A Fisher (``full``/``nodes``) or ``gram`` store through the public API (what
    ``mergekit-fisher estimate`` runs)."""
    from mergekit_fisher import estimate_fisher

    kind: dict[str, str] = {"statistic": "gram"} if store == "gram" else {"granularity": store}
    if store == "nodes":
        kind["node_mapping"] = settings.node_mapping
    estimate_fisher(
        model=str(model),
        data=[str(data)],
        out=str(out),
        mode=settings.fisher_mode,
        num_samples=settings.calib_size,
        max_length=settings.size.max_positions,
        batch_size=settings.fisher_batch_size,
        seed=seed,
        device=settings.device,
        overwrite=True,
        progress=False,
        **kind,
    )
    return out.resolve()


def recipe(
    row: str,
    base: Path,
    experts: Sequence[Path],
    stores: Mapping[str, Sequence[Path]] | None = None,
    ties_density: float = 0.5,
) -> dict[str, Any]:
    """The mergekit recipe of one merge row, as a dict (absolute paths: see the mergekit notes).

    ``stores`` maps a store kind (``full``, ``nodes``, ``gram``) to one store per expert, and
    ``base`` to the base's own Fisher store (anchored rows). Every recipe weight is 1.0: a
    searched row starts from the recipe of its unsearched twin and lets ``search`` change them.
    """
    spec = SPECS[row]
    stores = stores or {}
    key = {"fisher": "fisher", "regmean": "gram"}.get(spec.method, "")

    def entry(model: Path, store: Path | None = None, **extra: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"weight": 1.0, **extra}
        if store is not None:
            params[key] = str(store)
        return {"model": str(model), "parameters": params}

    out: dict[str, Any] = {"merge_method": spec.method}
    if spec.method in ("task_arithmetic", "ties"):
        extra = {"density": ties_density} if spec.method == "ties" else {}
        out["base_model"] = str(base)
        out["models"] = [entry(e, **extra) for e in experts]
    elif spec.store:
        if spec.anchored:
            out["base_model"] = str(base)
        out["models"] = [entry(e, s) for e, s in zip(experts, stores[spec.store], strict=True)]
        if spec.anchored:
            # Listed last, so that `search` (which keeps the first weight) searches its beta.
            out["models"].append(entry(base, stores["base"][0]))
    else:
        out["models"] = [entry(e) for e in experts]
    if spec.method == "fisher":
        out["parameters"] = {"normalize": True}
    out["dtype"] = "float32"
    return out


def recipe_text(config: Mapping[str, Any]) -> str:
    """A recipe dict as mergekit YAML."""
    import yaml

    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None)


def _quiet_transformers() -> Callable[[], None]:
    """Silence transformers' deprecation chatter for mergekit 0.1.5's `torch_dtype` argument;
    returns the function that restores the previous verbosity."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    return lambda: hf_logging.set_verbosity(verbosity)


def merge(config: Mapping[str, Any] | str, out: Path) -> list[str]:
    """Run one recipe through mergekit's ``run_merge``; returns the files it wrote."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_fisher.methods import register_methods

    register_methods()
    text = config if isinstance(config, str) else recipe_text(config)
    parsed = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)
    restore = _quiet_transformers()
    try:
        run_merge(parsed, str(out), options=options, config_source=text)
    finally:
        restore()
    return sorted(p.name for p in out.iterdir())


def _search(
    config: Mapping[str, Any], held_out: Path, scratch: Path, settings: DemoSettings
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Coefficient search on the held-out (``valid``) file; returns (best recipe, record)."""
    from mergekit_fisher.search import search

    scratch.mkdir(parents=True, exist_ok=True)
    restore = _quiet_transformers()
    try:
        result = search(
            config,
            [str(held_out)],
            grid={"weight": list(settings.search_weights)},
            num_samples=settings.search_samples,
            max_length=settings.size.max_positions,
            batch_size=64,
            device=settings.device,
            scratch=scratch,
        )
    finally:
        restore()
    names = [Path(m["model"]).name for m in config["models"]]
    grid = settings.search_weights
    searched = result.best.weights[1:]
    record = {
        "held_out": "valid",
        "num_samples": settings.search_samples,
        "target_tokens": result.sample_tokens,
        "models": names,
        "grid": list(grid),
        "candidates": [
            {"weights": list(c.weights), "loss": round(c.loss, 6)} for c in result.candidates
        ],
        "best": {"weights": list(result.best.weights), "loss": round(result.best.loss, 6)},
        "at_grid_edge": any(w in (min(grid), max(grid)) for w in searched),
        "seconds": round(result.seconds, 2),
    }
    return result.best_recipe, record


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


def _mixture(groups: Sequence[Sequence[Problem]], n: int) -> list[Problem]:
    """``n`` problems taken alternately from ``groups`` (an even mixture, in order)."""
    mixed = [p for row in zip(*groups) for p in row]
    if len(mixed) < n:
        raise ValueError(f"the groups hold {len(mixed)} interleaved problems, {n} asked")
    return mixed[:n]


class _Clock:
    """Accumulates wall time per stage (``lap("merge")`` after the merge)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(self.timings.get(stage, 0.0) + now - self._last, 2)
        self._last = now


def run_seed(
    seed: int, root: Path, settings: DemoSettings, granularities: list[str]
) -> dict[str, Any]:
    """Train, estimate, merge and evaluate one seed in every regime of ``settings``.

    Returns ``{"seed", "shared_timings_s" (base training, evaluation and Fisher), "regimes":
    {regime: that regime's part of the report}}``. ``granularities`` is updated in place when
    the estimator turns out not to support one.
    """
    device = settings.device
    clock = _Clock()
    evals = {t.name: sample_problems(t, "eval", settings.eval_size, seed, "eval") for t in TASKS}

    logger.info(
        "seed %d: training the base on the mixture of %s", seed, "+".join(t.name for t in TASKS)
    )
    base = build_model(settings.size, seed).to(device)
    base_curve = train(base, TASKS, settings.base, seed, "base", device)
    base_dir = _save(base, root / "models" / "base")
    clock.lap("train_base")
    base_scores = _scores(base, evals, device)
    clock.lap("evaluate_base")

    # Calibration data (per task, train split) and the held-out data of the search (valid
    # split), shared by the regimes; the base's Fisher is on an even mixture of the experts'
    # calibration data, the same total size.
    calib = {
        t.name: sample_problems(t, "train", settings.calib_size, seed, "calibration") for t in TASKS
    }
    calib_files = {
        name: write_jsonl(problems, root / "data" / f"{name}-calibration.jsonl")
        for name, problems in calib.items()
    }
    base_calib = write_jsonl(
        _mixture(list(calib.values()), settings.calib_size),
        root / "data" / "base-calibration.jsonl",
    )
    per_task = -(-settings.search_samples // len(TASKS))
    valid = [sample_problems(t, "valid", per_task, seed, "search") for t in TASKS]
    held_out = write_jsonl(
        _mixture(valid, settings.search_samples), root / "data" / "valid-mixture.jsonl"
    )
    logger.info("seed %d: estimating the base's Fisher on the calibration mixture", seed)
    base_store = _estimate(
        base_dir, base_calib, root / "fishers" / "base-full", "full", settings, seed
    )
    clock.lap("estimate_base")

    regimes: dict[str, Any] = {}
    for regime in settings.regimes:
        t0 = time.perf_counter()
        regimes[regime] = _run_regime(
            regime,
            seed,
            root / regime,
            settings,
            granularities,
            base,
            base_dir,
            base_store,
            calib_files,
            held_out,
            evals,
        )
        regimes[regime]["scores"]["base"] = {t: asdict(s) for t, s in base_scores.items()}
        regimes[regime]["final_train_loss"]["base"] = round(base_curve[-1], 5)
        regimes[regime]["wall_time_s"] = round(time.perf_counter() - t0, 2)
        _order_scores(regimes[regime])
    if not settings.keep_models:
        for sub in ("models", "fishers"):
            shutil.rmtree(root / sub, ignore_errors=True)
    return {"seed": seed, "shared_timings_s": clock.timings, "regimes": regimes}


def _order_scores(part: dict[str, Any]) -> None:
    """Put the base first in the per-seed scores (it is evaluated once, before the regimes)."""
    scores = part["scores"]
    part["scores"] = {"base": scores.pop("base"), **scores}
    part["normalized_accuracy"] = _normalized(part["scores"])


def _run_regime(
    regime: str,
    seed: int,
    root: Path,
    settings: DemoSettings,
    granularities: list[str],
    base: torch.nn.Module,
    base_dir: Path,
    base_store: Path,
    calib_files: Mapping[str, Path],
    held_out: Path,
    evals: dict[str, list[Problem]],
) -> dict[str, Any]:
    """Experts, their stores, every merge and every evaluation of one regime of one seed."""
    device = settings.device
    clock = _Clock()
    scores: dict[str, dict[str, TaskScore]] = {}
    curves: dict[str, list[float]] = {}
    experts: list[Path] = []
    for task in TASKS:
        logger.info("seed %d, %s: fine-tuning expert %s", seed, regime, task.name)
        expert = copy.deepcopy(base)
        curves[f"expert {task.name}"] = train(
            expert,
            [task],
            settings.expert_training(regime),
            seed,
            f"expert-{task.name}",
            device,
        )
        experts.append(_save(expert, root / "models" / f"expert-{task.name}"))
        clock.lap("train_experts")
        scores[f"expert {task.name}"] = _scores(expert, evals, device)
        clock.lap("evaluate")
        del expert

    stores: dict[str, list[Path]] = {"base": [base_store]}
    for kind in [*granularities, "gram"]:
        found: list[Path] = []
        try:
            for task, expert_dir in zip(TASKS, experts):
                logger.info(
                    "seed %d, %s: estimating %s of expert %s", seed, regime, kind, task.name
                )
                out = root / "fishers" / f"{kind}-{task.name}"
                found.append(
                    _estimate(expert_dir, calib_files[task.name], out, kind, settings, seed)
                )
        except Exception as error:
            if kind != "nodes" or not _nodes_unavailable(error):
                raise
            logger.warning("skipping fisher (nodes): the estimator says %s", error)
            granularities.remove(kind)
            continue
        finally:
            clock.lap("estimate")
        stores[kind] = found

    merges: dict[str, dict[str, Any]] = {}
    searches: dict[str, dict[str, Any]] = {}
    for row in model_rows(granularities)[1 + len(TASKS) :]:
        config = recipe(row, base_dir, experts, stores, settings.ties_density)
        if SPECS[row].searched:
            logger.info("seed %d, %s: searching %s on the valid split", seed, regime, row)
            config, searches[row] = _search(
                config, held_out, root / "search" / _slug(row), settings
            )
            clock.lap("search")
        slug = _slug(row)
        recipe_path = root / "recipes" / f"{slug}.yml"
        recipe_path.parent.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(recipe_text(config))
        logger.info("seed %d, %s: merging with %s", seed, regime, row)
        out = root / "merges" / slug
        files = merge(config, out)
        clock.lap("merge")
        merged = _load(out, device)
        scores[row] = _scores(merged, evals, device)
        clock.lap("evaluate")
        del merged
        merges[row] = {"recipe": str(recipe_path), "output": str(out), "files": files}

    if not settings.keep_models:
        for sub in ("models", "fishers", "merges", "search"):
            shutil.rmtree(root / sub, ignore_errors=True)
    return {
        "seed": seed,
        "scores": {
            row: {t: asdict(s) for t, s in by_task.items()} for row, by_task in scores.items()
        },
        "merges": merges,
        "search": searches,
        "final_train_loss": {k: round(v[-1], 5) for k, v in curves.items()},
        "timings_s": clock.timings,
    }


def _normalized(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Each row's accuracy on each task over that task's expert's, averaged over the tasks."""
    out = {}
    for row, by_task in scores.items():
        ratios = []
        for t in TASKS:
            expert = scores[f"expert {t.name}"][t.name]["accuracy"]
            ratios.append(by_task[t.name]["accuracy"] / expert if expert > 0 else 0.0)
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


def verdict(
    summary: dict[str, Any], per_seed: Sequence[dict[str, Any]], regime: str = ""
) -> dict[str, Any]:
    """The best merge by mean normalized accuracy, its margin over ``linear``, the seeds in
    which each merge beat ``linear``, and where the unmerged base stands."""
    merges = [row for row in summary if row in SPECS]
    mean = {row: summary[row]["normalized_accuracy"]["mean"] for row in merges}
    ranked = sorted(merges, key=lambda row: -mean[row])
    best = ranked[0]
    n = len(per_seed)
    wins = {
        row: sum(
            s["normalized_accuracy"][row] > s["normalized_accuracy"]["linear"] for s in per_seed
        )
        for row in merges
        if row != "linear"
    }
    margin = mean[best] - mean["linear"]
    std = summary[best]["normalized_accuracy"]["std"]
    runner_up = ranked[1] if len(ranked) > 1 else best

    def ahead(row: str, other: str) -> int:
        """Seeds in which ``row`` beat ``other`` (paired: same seed, same experts)."""
        return sum(
            s["normalized_accuracy"][row] > s["normalized_accuracy"][other] for s in per_seed
        )

    head = f"{regime}: " if regime else ""
    if best == "linear":
        text = (
            f"{head}linear won: mean normalized accuracy {mean['linear']:.3f} ± {std:.3f}, "
            f"{mean['linear'] - mean[runner_up]:.3f} ahead of {runner_up} ({mean[runner_up]:.3f}; "
            f"ahead of it in {ahead(best, runner_up)}/{n} seeds)"
        )
    else:
        text = (
            f"{head}{best} won: mean normalized accuracy {mean[best]:.3f} ± {std:.3f} vs linear "
            f"{mean['linear']:.3f} ({margin:+.3f}; ahead of linear in {wins[best]}/{n} seeds; "
            f"runner-up {runner_up} {mean[runner_up]:.3f}, {best} ahead of it in "
            f"{ahead(best, runner_up)}/{n} seeds)"
        )
    others = [
        f"{row} {mean[row]:.3f} ({mean[row] - mean['linear']:+.3f}, {wins[row]}/{n})"
        for row in ranked
        if row not in (best, "linear")
    ]
    if others:
        text += "; others vs linear (seeds ahead): " + ", ".join(others)
    base = summary["base"]["normalized_accuracy"]["mean"]
    above = [row for row in ranked if mean[row] > base]
    relation = "above" if mean[best] > base else "below" if mean[best] < base else "level with"
    text += (
        f"; the unmerged base scores {base:.3f} ({best} is {relation} it, ahead in "
        f"{ahead(best, 'base')}/{n} seeds; {len(above)}/{len(merges)} merges are above it)"
    )
    return {
        "best": best,
        "best_mean": mean[best],
        "linear_mean": mean["linear"],
        "base_mean": base,
        "margin_over_linear": margin,
        "seeds_ahead_of_linear": wins,
        "runner_up": runner_up,
        "seeds_ahead_of_runner_up": ahead(best, runner_up),
        "seeds_ahead_of_base": ahead(best, "base"),
        "merges_above_base": above,
        "ranking": ranked,
        "text": text,
    }


def _table(summary: Mapping[str, Any], names: Sequence[str]) -> list[str]:
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
    return lines


def _search_lines(part: Mapping[str, Any]) -> list[str]:
    """Which coefficients each search chose in each seed (and whether at the grid's edge)."""
    lines = []
    for row in SPECS:
        runs = [(s["seed"], s["search"][row]) for s in part["seeds"] if row in s.get("search", {})]
        if not runs:
            continue
        records = [r for _, r in runs]
        chosen = ", ".join(f"seed {seed}: {r['best']['weights']}" for seed, r in runs)
        edges = sum(r["at_grid_edge"] for r in records)
        models = " / ".join(records[0]["models"])
        lines.append(
            f"search for {row} (weights {models}; valid loss, grid {records[0]['grid']}): "
            f"{chosen}; at the grid's edge in {edges}/{len(records)} seeds"
        )
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The demo's result tables (one per regime, mean ± std over seeds) and verdicts."""
    names = [t["name"] for t in report["tasks"]]
    lines: list[str] = []
    for regime, part in report["regimes"].items():
        training = part["expert_training"]
        lines.append(
            f"== regime {regime}: experts fine-tuned {training['steps']} steps at lr "
            f"{training['lr']:g} from the base =="
        )
        lines += _table(part["summary"], names)
        lines += _search_lines(part)
        lines.append(f"verdict: {part['verdict']['text']}")
        lines.append("")
    seeds = len(report["seeds"])
    lines.append(
        f"mean ± std over {seeds} seed{'s' * (seeds != 1)}; norm acc = accuracy on each task / "
        "that task's expert's (same regime and seed), averaged over the tasks"
    )
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars per regime (accuracy per task and normalized accuracy, std error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t["name"] for t in report["tasks"]]
    series = [(f"accuracy_{n}", f"accuracy {n}") for n in names]
    series.append(("normalized_accuracy", "normalized accuracy"))
    width = 0.8 / len(series)
    parts = report["regimes"]
    widest = max(len(p["summary"]) for p in parts.values())
    fig, axes = plt.subplots(
        len(parts), 1, figsize=(max(8.0, 1.1 * widest), 4.2 * len(parts)), squeeze=False
    )
    seeds = len(report["seeds"])
    for ax, (regime, part) in zip(axes[:, 0], parts.items()):
        summary = part["summary"]
        rows = list(summary)
        for i, (key, label) in enumerate(series):
            xs = [r + (i - (len(series) - 1) / 2) * width for r in range(len(rows))]
            means = [summary[row][key]["mean"] for row in rows]
            stds = [summary[row][key]["std"] for row in rows]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(rows, rotation=20, ha="right")
        ax.set_ylabel("exact-match accuracy")
        ax.set_ylim(0, max(1.15, *(summary[r]["normalized_accuracy"]["mean"] + 0.1 for r in rows)))
        training = part["expert_training"]
        ax.set_title(
            f"regime {regime} (experts: {training['steps']} steps at lr {training['lr']:g}); "
            f"{seeds} seeds, mean ± std"
        )
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

    ``out`` receives report.json, chart.png and, per seed and regime, the recipes used (and
    the models, stores and merges with ``keep_models``). ``on_seed`` is called after each seed.
    """
    settings = settings or DemoSettings()
    for regime in settings.regimes:
        settings.expert_training(regime)  # refuses an unknown regime before any work
    if not settings.regimes:
        raise ValueError("no regime to run: pass at least one of " + ", ".join(REGIMES))
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
    regimes: dict[str, Any] = {}
    for regime in settings.regimes:
        seeds = [s["regimes"][regime] for s in per_seed]
        # A granularity dropped mid-run leaves earlier seeds with rows later ones lack: keep
        # the rows every seed has.
        rows = [r for r in model_rows(granularities) if all(r in s["scores"] for s in seeds)]
        summary = summarize(seeds, rows)
        regimes[regime] = {
            "expert_training": asdict(settings.expert_training(regime)),
            "rows": rows,
            "seeds": seeds,
            "summary": summary,
            "verdict": verdict(summary, seeds, regime),
        }
    skipped = [
        f"fisher ({g}): the estimator does not implement it"
        for g in settings.granularities
        if g not in granularities
    ]
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "tasks": [{"name": t.name, "description": t.description} for t in TASKS],
        "seeds": [{k: s[k] for k in ("seed", "shared_timings_s", "wall_time_s")} for s in per_seed],
        "regimes": regimes,
        "skipped": skipped,
        "versions": versions,
    }
    report["wall_time_s"] = round(time.perf_counter() - start, 2)
    report["chart"] = str(chart(report, out / "chart.png"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
