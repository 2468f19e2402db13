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
4. merge through mergekit's own ``run_merge`` (what ``mergekit-yaml`` runs) with every row of
   ``rows.SPECS``: mergekit's ``linear``, ``karcher``, ``task_arithmetic``, ``ties`` and
   ``dare_ties``; ``fisher`` (full, nodes), ``fisher`` anchored on the base, both with
   coefficients chosen by ``mergekit_fisher.search`` on the ``valid`` split, ``regmean``, and
   the task-vector methods ``fisher_arithmetic`` and ``fisher_ties``; and ``search (all
   methods)``: whatever ``search --methods all`` picks on the ``valid`` split (one file per
   task), mergekit's methods included;
5. evaluate base, experts and merges on ``eval_size`` held-out problems per task (greedy
   exact match and completion loss).

Every setting below was fixed before any merge was evaluated, from training curves and the
``valid`` split only; the evaluation split is never used to choose anything (the coefficient
search scores candidates on ``valid``). The verdict reports, per regime, the best merge, its
margin over ``linear`` and where the unmerged base stands, whatever the outcome (``report``
makes the summaries, verdicts, tables and chart; ``rows`` says how each merge row is made).
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergekit_fisher.demo.evaluate import TaskScore, evaluate
from mergekit_fisher.demo.report import format_report, normalized, regime_part, save
from mergekit_fisher.demo.rows import SPECS, MergeSpec, model_rows
from mergekit_fisher.demo.tasks import TASKS, Problem, make_tokenizer, sample_problems, write_jsonl
from mergekit_fisher.demo.train import ModelSize, TrainSettings, build_model, train

if TYPE_CHECKING:
    from mergekit_fisher.search import Scored, SearchResult

__all__ = ["REGIMES", "DemoSettings", "recipe", "run_demo", "run_from_cli"]

logger = logging.getLogger(__name__)


REGIMES = ("close", "forget")
"""``close``: experts a short, gentle fine-tune away from the base; ``forget``: experts trained
until each has forgotten the other task."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything that shapes a run. The defaults are the documented demo (docs/demo.md).

    ``close`` and ``forget`` are the expert fine-tuning of the two regimes; ``regimes`` says
    which to run (the base is trained once per seed and shared). ``ties_density`` is every
    expert's ``density`` in the ``ties`` and ``dare_ties`` rows. ``search_weights`` is the grid
    of the searched rows: the ``rev`` expert's weight (and, when anchored, the base's anchor
    strength), each over these values (the ``add`` expert's weight stays 1), scored by
    completion loss on ``search_samples`` ``valid`` problems (half per task).

    ``threads`` is torch's intra-op thread count for the run (0: leave torch's default). One
    thread is the default because a 64-wide model gains little from a second one, and on a
    busy 2-core machine two spinning OpenMP threads made training ten times slower (measured).
    ``workers`` runs that many seeds side by side, each in its own process (one core each; a
    seed's numbers do not depend on it).
    """

    seeds: int = 3
    first_seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    base: TrainSettings = field(default_factory=lambda: TrainSettings(steps=600, lr=3e-3))
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
    workers: int = 1
    keep_models: bool = False

    def expert_training(self, regime: str) -> TrainSettings:
        """The expert fine-tuning of ``regime``."""
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}: one of {', '.join(REGIMES)}")
        return self.close if regime == "close" else self.forget


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
    if spec.search == "methods":
        return _search_inputs(base, experts, stores)
    key = "gram" if spec.store == "gram" else "fisher"
    extra = {"density": ties_density} if spec.trimmed else {}

    def entry(model: Path, store: Path | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"weight": 1.0, **extra} if spec.weighted else {}
        if store is not None:
            params[key] = str(store)
        return {"model": str(model), "parameters": params} if params else {"model": str(model)}

    out: dict[str, Any] = {"merge_method": spec.method}
    if spec.task_vectors or spec.anchored:
        out["base_model"] = str(base)
    own: Sequence[Path | None] = stores[spec.store] if spec.store else [None] * len(experts)
    out["models"] = [entry(e, s) for e, s in zip(experts, own, strict=True)]
    if spec.anchored:
        # Listed last, so that `search` (which keeps the first weight) searches its beta.
        out["models"].append(entry(base, stores["base"][0]))
    if spec.method == "fisher":
        out["parameters"] = {"normalize": True}
    out["dtype"] = "float32"
    return out


def _search_inputs(
    base: Path, experts: Sequence[Path], stores: Mapping[str, Sequence[Path]]
) -> dict[str, Any]:
    """What ``search --methods`` starts from (``real.pipeline.search_inputs``)."""
    from mergekit_fisher.real.pipeline import search_inputs

    return search_inputs(base, experts, stores["full"], stores["gram"])


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
    spec: MergeSpec,
    config: Mapping[str, Any],
    shared: _SeedData,
    scratch: Path,
    settings: DemoSettings,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The row's search on the ``valid`` split; returns (best recipe, record)."""
    from mergekit_fisher.search import parse_methods, search

    scratch.mkdir(parents=True, exist_ok=True)
    if spec.search == "methods":
        # One file per task, so that each task counts equally (the per-task objective).
        data = [str(p) for p in shared.valid_files.values()]
        how: dict[str, Any] = {"methods": parse_methods(spec.method)}
        samples = -(-settings.search_samples // len(data))
    else:
        data, how, samples = (
            [str(shared.held_out)],
            {"grid": {"weight": list(settings.search_weights)}},
            settings.search_samples,
        )
    restore = _quiet_transformers()
    try:
        result = search(
            config,
            data,
            num_samples=samples,
            max_length=settings.size.max_positions,
            batch_size=64,
            device=settings.device,
            scratch=scratch,
            **how,
        )
    finally:
        restore()
    record = {
        "held_out": "valid",
        "num_samples": settings.search_samples,
        "target_tokens": result.sample_tokens,
        "models": [Path(m["model"]).name for m in config["models"]],
        "seconds": round(result.seconds, 2),
    }
    if spec.search == "methods":
        record.update(_methods_record(result))
    else:
        record.update(_weights_record(result, settings.search_weights))
    return result.best_recipe, record


def _weights_record(result: SearchResult, grid: Sequence[float]) -> dict[str, Any]:
    """Each weight candidate's loss (on the first rows only if ``pruned``), the best, and
    whether a searched weight hit the grid's edge (the first weight stays fixed)."""
    return {
        "grid": list(grid),
        "candidates": [
            {"weights": list(c.weights), "loss": round(c.loss, 6), "pruned": c.pruned}
            for c in result.candidates
        ],
        "best": {"weights": list(result.best.weights), "loss": round(result.best.loss, 6)},
        "at_grid_edge": any(w in (min(grid), max(grid)) for w in result.best.weights[1:]),
    }


def _methods_record(result: SearchResult) -> dict[str, Any]:
    """Each method candidate's label, per-task losses and objective, and the pick."""

    def entry(s: Scored) -> dict[str, Any]:
        losses = {Path(x.source).stem: round(x.mean, 6) for x in s.losses}
        return {
            "method": s.candidate.method,
            "label": s.label(),
            "losses": losses,
            "loss": round(s.loss, 6),
            "pruned": s.pruned,
        }

    return {"candidates": [entry(s) for s in result.candidates], "best": entry(result.best)}


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


@dataclass
class _SeedData:
    """What every regime of one seed shares: the trained base, its Fisher store, the data files
    and the evaluation problems."""

    seed: int
    base: torch.nn.Module
    base_dir: Path
    base_store: Path
    calib_files: dict[str, Path]
    held_out: Path
    valid_files: dict[str, Path]
    evals: dict[str, list[Problem]]


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
    shared = _seed_data(seed, root, settings, base, base_dir, evals)
    clock.lap("estimate_base")

    regimes: dict[str, Any] = {}
    for regime in settings.regimes:
        t0 = time.perf_counter()
        regimes[regime] = _run_regime(regime, root / regime, settings, granularities, shared)
        regimes[regime]["scores"]["base"] = {t: asdict(s) for t, s in base_scores.items()}
        regimes[regime]["final_train_loss"]["base"] = round(base_curve[-1], 5)
        regimes[regime]["wall_time_s"] = round(time.perf_counter() - t0, 2)
        _order_scores(regimes[regime])
    if not settings.keep_models:
        for sub in ("models", "fishers"):
            shutil.rmtree(root / sub, ignore_errors=True)
    return {"seed": seed, "shared_timings_s": clock.timings, "regimes": regimes}


def _seed_data(
    seed: int,
    root: Path,
    settings: DemoSettings,
    base: torch.nn.Module,
    base_dir: Path,
    evals: dict[str, list[Problem]],
) -> _SeedData:
    """Calibration data (per task, train split) and the held-out data of the search (valid
    split), shared by the regimes, and the base's Fisher on an even mixture of the experts'
    calibration data, the same total size."""
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
    valid_files = {
        t.name: write_jsonl(problems, root / "data" / f"{t.name}-valid.jsonl")
        for t, problems in zip(TASKS, valid, strict=True)
    }
    logger.info("seed %d: estimating the base's Fisher on the calibration mixture", seed)
    base_store = _estimate(
        base_dir, base_calib, root / "fishers" / "base-full", "full", settings, seed
    )
    return _SeedData(seed, base, base_dir, base_store, calib_files, held_out, valid_files, evals)


def _order_scores(part: dict[str, Any]) -> None:
    """Put the base first in the per-seed scores (it is evaluated once, before the regimes)."""
    scores = part["scores"]
    part["scores"] = {"base": scores.pop("base"), **scores}
    part["normalized_accuracy"] = normalized(part["scores"])


def _run_regime(
    regime: str, root: Path, settings: DemoSettings, granularities: list[str], shared: _SeedData
) -> dict[str, Any]:
    """Experts, their stores, every merge and every evaluation of one regime of one seed."""
    run = _RegimeRun(regime, root, settings, shared)
    experts, curves = run.train_experts()
    stores = run.estimate_stores(experts, granularities)
    merges, searches = run.merge_rows(experts, stores, granularities)
    if not settings.keep_models:
        for sub in ("models", "fishers", "merges", "search"):
            shutil.rmtree(root / sub, ignore_errors=True)
    return {
        "seed": shared.seed,
        "scores": {
            row: {t: asdict(s) for t, s in by_task.items()} for row, by_task in run.scores.items()
        },
        "merges": merges,
        "search": searches,
        "final_train_loss": {k: round(v[-1], 5) for k, v in curves.items()},
        "timings_s": run.clock.timings,
    }


@dataclass
class _RegimeRun:
    """The steps of one regime of one seed; collects scores and stage timings as it goes."""

    regime: str
    root: Path
    settings: DemoSettings
    shared: _SeedData
    clock: _Clock = field(default_factory=_Clock)
    scores: dict[str, dict[str, TaskScore]] = field(default_factory=dict)

    def _log(self, message: str, *args: object) -> None:
        logger.info("seed %d, %s: " + message, self.shared.seed, self.regime, *args)

    def _evaluate(self, row: str, model: torch.nn.Module) -> None:
        self.scores[row] = _scores(model, self.shared.evals, self.settings.device)
        self.clock.lap("evaluate")

    def train_experts(self) -> tuple[list[Path], dict[str, list[float]]]:
        """One expert per task, fine-tuned from the base, saved and evaluated."""
        curves: dict[str, list[float]] = {}
        experts: list[Path] = []
        for task in TASKS:
            self._log("fine-tuning expert %s", task.name)
            expert = copy.deepcopy(self.shared.base)
            curves[f"expert {task.name}"] = train(
                expert,
                [task],
                self.settings.expert_training(self.regime),
                self.shared.seed,
                f"expert-{task.name}",
                self.settings.device,
            )
            experts.append(_save(expert, self.root / "models" / f"expert-{task.name}"))
            self.clock.lap("train_experts")
            self._evaluate(f"expert {task.name}", expert)
            del expert
        return experts, curves

    def estimate_stores(
        self, experts: list[Path], granularities: list[str]
    ) -> dict[str, list[Path]]:
        """Each store kind for every expert, plus the base's; drops ``nodes`` (from
        ``granularities`` too) when the estimator does not implement it."""
        stores: dict[str, list[Path]] = {"base": [self.shared.base_store]}
        for kind in [*granularities, "gram"]:
            found: list[Path] = []
            try:
                for task, expert_dir in zip(TASKS, experts):
                    self._log("estimating %s of expert %s", kind, task.name)
                    out = self.root / "fishers" / f"{kind}-{task.name}"
                    calib = self.shared.calib_files[task.name]
                    found.append(
                        _estimate(expert_dir, calib, out, kind, self.settings, self.shared.seed)
                    )
            except Exception as error:
                if kind != "nodes" or not _nodes_unavailable(error):
                    raise
                logger.warning("skipping fisher (nodes): the estimator says %s", error)
                granularities.remove(kind)
                continue
            finally:
                self.clock.lap("estimate")
            stores[kind] = found
        return stores

    def merge_rows(
        self, experts: list[Path], stores: dict[str, list[Path]], granularities: list[str]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Every merge row (searched rows after their search), each merged and evaluated;
        returns (what each merge wrote, each search's record)."""
        merges: dict[str, dict[str, Any]] = {}
        searches: dict[str, dict[str, Any]] = {}
        for row in model_rows(granularities)[1 + len(TASKS) :]:
            config = recipe(row, self.shared.base_dir, experts, stores, self.settings.ties_density)
            slug = _slug(row)
            if SPECS[row].search:
                self._log("searching %s on the valid split", row)
                config, searches[row] = _search(
                    SPECS[row], config, self.shared, self.root / "search" / slug, self.settings
                )
                self.clock.lap("search")
            recipe_path = self.root / "recipes" / f"{slug}.yml"
            recipe_path.parent.mkdir(parents=True, exist_ok=True)
            recipe_path.write_text(recipe_text(config))
            self._log("merging with %s", row)
            out = self.root / "merges" / slug
            torch.manual_seed(self.shared.seed)  # DARE drops at random: same draw in every run
            files = merge(config, out)
            self.clock.lap("merge")
            merged = _load(out, self.settings.device)
            self._evaluate(row, merged)
            del merged
            merges[row] = {"recipe": str(recipe_path), "output": str(out), "files": files}
        return merges, searches


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("mergekit-fisher", "mergekit", "torch", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    out["torch_threads"] = str(torch.get_num_threads())
    return out


def _seed_job(
    seed: int, root: Path, settings: DemoSettings, granularities: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """One seed, timed, with torch's threads as ``settings`` says; also the granularities the
    estimator kept (``run_seed`` drops one it does not implement)."""
    threads = torch.get_num_threads()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    try:
        t0 = time.perf_counter()
        result = run_seed(seed, root, settings, granularities)
        result["wall_time_s"] = round(time.perf_counter() - t0, 2)
        return result, granularities
    finally:
        torch.set_num_threads(threads)


def _run_seeds(
    jobs: list[tuple[int, Path, DemoSettings, list[str]]], workers: int
) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """Each seed's result as it finishes: in this process, or ``workers`` seeds side by side in
    spawned processes (fork is unsafe once torch has started its thread pools)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from (_seed_job(*job) for job in jobs)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(_seed_job, *job) for job in jobs]
        yield from (future.result() for future in as_completed(futures))


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
    seeds = range(settings.first_seed, settings.first_seed + settings.seeds)
    jobs = [(seed, out / f"seed-{seed}", settings, list(granularities)) for seed in seeds]
    for result, kept in _run_seeds(jobs, settings.workers):
        granularities = [g for g in granularities if g in kept]
        logger.info("seed %d done in %.0f s", result["seed"], result["wall_time_s"])
        per_seed.append(result)
        if on_seed is not None:
            on_seed(result)
    per_seed.sort(key=lambda r: r["seed"])
    regimes: dict[str, Any] = {}
    for regime in settings.regimes:
        seeds = [s["regimes"][regime] for s in per_seed]
        # A granularity dropped mid-run leaves earlier seeds with rows later ones lack: keep
        # the rows every seed has.
        rows = [r for r in model_rows(granularities) if all(r in s["scores"] for s in seeds)]
        training = asdict(settings.expert_training(regime))
        regimes[regime] = regime_part(seeds, rows, training, regime)
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
        "versions": versions(),
    }
    report["wall_time_s"] = round(time.perf_counter() - start, 2)
    save(report, out)
    return report


def run_from_cli(out: str, seeds: int, regime: str, keep_models: bool) -> str:
    """``mergekit-fisher demo``: run the documented demo and return what the command prints
    (tables, verdicts, skipped rows, where the report went)."""
    start = time.perf_counter()
    regimes = REGIMES if regime == "both" else (regime,)
    workers = min(2, os.cpu_count() or 1)  # the README's 2-core machine: two seeds at a time
    settings = DemoSettings(seeds=seeds, regimes=regimes, keep_models=keep_models, workers=workers)
    report = run_demo(out, settings)
    chart = f"  chart: {report['chart']}" if report["chart"] else ""
    return (
        f"{format_report(report)}\nreport: {out}/report.json{chart}  "
        f"wall time: {time.perf_counter() - start:.0f} s"
    )
