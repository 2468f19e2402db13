"""Merge quality on a real pretrained LLM: SmolLM2-135M-Instruct experts on eight chat tasks.

For each seed: fully fine-tune one expert per task from the base (gentle: 30 steps at lr 5e-5,
batch 16, as community experts are made), estimate each expert's stores on its own calibration
split, merge 2 experts (acronym + max), 4 experts (+ pick, reverse) and 8 experts (+ count, add,
upper, last) with every method we ship and mergekit's own at their documented defaults (weight 1;
density 0.5 where a method trims), and score every model by greedy exact match and answer loss
on held-out problems. Normalized exact match = each task's exact match / its expert's, averaged
over the merged tasks (1.0: every expert kept whole). A setting's experts and stores are its
tasks' own, so the larger settings reuse the smaller ones' cache.

The steps (fine-tuning an expert, its stores, a method's recipe at its defaults, search, scoring,
normalized EM) are mergekit_fisher/real/pipeline.py's, the same that `mergekit-fisher demo` runs.
Everything is cached under --workdir by seed (experts, stores, one JSON line per scored model),
so an interrupted run resumes and new rows cost only their own merges. Tasks, splits and fine-tune
settings were fixed before any merge was scored (mergekit_fisher/real/chat_tasks.py).

``--calibration`` says what the stores are estimated on (mergekit_fisher/real/calibration.py):
``own`` (each expert's own task, the default), ``shared`` (one set for every expert of a setting,
drawn equally from its tasks) or ``generic`` (one set of everyday chat answered by the base
model, none of the tasks), every set as large as one ``own`` set. The experts are the same for
every kind; stores, scores and search records of ``shared``/``generic`` carry the kind's name.

    python scripts/bench_quality_real.py --workdir /tmp/real --seeds 0 1 2
    python scripts/bench_quality_real.py --workdir /tmp/real --seeds 0 --settings "8 experts"
    python scripts/bench_quality_real.py --workdir /tmp/real --calibration generic shared
    python scripts/bench_quality_real.py --workdir /tmp/real --report   # tables from the cache

A row is a method (``fisher_nodes``: node stores), optionally with shared parameters
(``fisher_arithmetic:gamma=0.2``), or ``searched[:m1+m2+...]``: ``search --methods`` (default
all) on each task's valid split, its pick scored on eval like every other row.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergekit_fisher.real import calibration, chat_model, chat_tasks, pipeline, smollm2
from mergekit_fisher.real.pipeline import MERGEKIT_ROWS, OUR_ROWS, SIZES
from mergekit_fisher.store import write_text_atomic

LOG = logging.getLogger("bench_quality_real")

SETTINGS = {
    "2 experts": ("acronym", "max"),
    "4 experts": ("acronym", "max", "pick", "reverse"),
    "8 experts": ("acronym", "max", "pick", "reverse", "count", "add", "upper", "last"),
}


def scores_path(args: argparse.Namespace, seed: int, kind: calibration.Kind) -> Path:
    """One seed's scores on the split being scored with one calibration kind; a split of
    another size has its own file, and so has every kind but ``own`` (its files predate them)."""
    n = split_size(args, args.split)
    size = "" if n == SIZES[args.split] else str(n)
    return args.workdir / f"seed{seed}" / f"scores-{args.split}{size}{_suffix(kind)}.jsonl"


def _suffix(kind: calibration.Kind) -> str:
    """What a cached file of calibration ``kind`` adds to its name: nothing for ``own``."""
    return "" if kind == "own" else f"-{kind}"


def split_size(args: argparse.Namespace, split: str) -> int:
    """Problems a task scored on ``split``: ``--eval-size``/``--valid-size``, else the fixed size."""
    return int(getattr(args, f"{split}_size", SIZES[split]))


def problems(
    args: argparse.Namespace, task: str, split: chat_tasks.Split, seed: int
) -> list[chat_tasks.Problem]:
    """A split's problems of ``task``, as many as ``split_size`` says."""
    return chat_tasks.problems(task, split, split_size(args, split), seed=seed)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="cache of experts, stores, scores")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=[*MERGEKIT_ROWS, *OUR_ROWS])
    p.add_argument(
        "--settings",
        nargs="+",
        default=["2 experts", "4 experts"],  # 8 experts (an hour a seed on CPU) when asked
        choices=list(SETTINGS),
    )
    p.add_argument("--steps", type=int, default=chat_model.GENTLE.steps, help="fine-tune steps")
    p.add_argument("--lr", type=float, default=chat_model.GENTLE.lr, help="fine-tune peak lr")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--split",
        default="eval",
        choices=["eval", "valid"],
        help="score on held-out eval problems (the tables) or on valid (to choose defaults)",
    )
    p.add_argument(
        "--eval-size",
        type=int,
        default=SIZES["eval"],
        help="eval problems per task; the first 100 are the default's, so a larger split is a "
        "superset, scored into its own file (scores-eval<N>.jsonl)",
    )
    p.add_argument(
        "--valid-size",
        type=int,
        default=SIZES["valid"],
        help="valid problems per task scored with --split valid (a superset of the 64 that "
        "search and the stores' checks use), into scores-valid<N>.jsonl; to choose defaults",
    )
    p.add_argument(
        "--calibration",
        nargs="+",
        default=["own"],
        choices=calibration.KINDS,
        help="what the stores are estimated on: each expert's own task (own), one set drawn "
        "from all the setting's tasks (shared), everyday chat answered by the base (generic)",
    )
    p.add_argument("--report", action="store_true", help="only print the tables from the cache")
    p.add_argument("--chart", type=Path, help="also draw normalized EM per method (PNG)")
    return p.parse_args(argv)


class Bench:
    """One seed's cached experiment with one calibration kind: data, experts, stores, merges,
    scores."""

    def __init__(self, args: argparse.Namespace, seed: int, kind: calibration.Kind):
        from transformers import AutoTokenizer

        self.args, self.seed, self.kind = args, seed, kind
        self.root = args.workdir / f"seed{seed}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.base = smollm2.model_dir(args.workdir / "cache")
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.scores_file = scores_path(args, seed, kind)

    def data(self, task: str, split: str) -> Path:
        path = self.root / "data" / f"{task}-{split}.jsonl"
        if not path.exists():
            items = chat_tasks.problems(task, split, SIZES[split], seed=self.seed)
            chat_tasks.write_jsonl(items, path)
        return path

    def calibration_set(self, tasks: Sequence[str]) -> str:
        """The name of the set every expert of a merge of ``tasks`` is measured on; empty for
        ``own``, whose set is each expert's own calib split."""
        names = {"own": "", "shared": "shared-" + "+".join(tasks), "generic": "generic"}
        return names[self.kind]

    def calib(self, task: str, tasks: Sequence[str]) -> Path:
        """The calibration file of ``task``'s expert in a merge of ``tasks``: its own calib
        split, or the kind's set, built once per seed (``SIZES["calib"]`` problems either way)."""
        name = self.calibration_set(tasks)
        if not name:
            return self.data(task, "calib")
        path = self.root / "data" / f"calib-{name}.jsonl"
        if not path.exists():
            n = SIZES["calib"]
            items = (
                calibration.shared(tasks, n, self.seed)
                if self.kind == "shared"
                else calibration.generic(self.base_answers, n, self.seed)
            )
            chat_tasks.write_jsonl(items, path)
        return path

    def base_answers(self, items: Sequence[chat_tasks.Problem]) -> list[str]:
        """The base model's own greedy replies: generic chat in the model's voice."""
        model = pipeline.load_model(self.base, self.args.device)
        return calibration.greedy_answers(model, self.tokenizer, items)

    def expert(self, task: str) -> Path:
        settings = dataclasses.replace(chat_model.GENTLE, steps=self.args.steps, lr=self.args.lr)
        return pipeline.finetune_expert(
            self.base,
            task,
            self.root / f"expert-{task}",
            seed=self.seed,
            settings=settings,
            device=self.args.device,
        )

    def store(self, task: str, kind: str, tasks: Sequence[str]) -> Path:
        """``task``'s expert's store of ``kind`` (full, nodes, gram) on its calibration set in
        a merge of ``tasks``; a shared or generic set's name is in the directory's."""
        out = self.root / "-".join(filter(None, ("store", task, kind, self.calibration_set(tasks))))
        if (out / "fisher_config.json").exists():  # its calibration set is not needed then
            return out
        calib = self.calib(task, tasks)
        return pipeline.estimate_store(
            self.expert(task), calib, out, kind, seed=self.seed, device=self.args.device
        )

    def recipe(self, row: str, tasks: Sequence[str]) -> dict[str, Any]:
        """A row is a method name (``_nodes``: node stores), optionally with shared parameters,
        each value read as YAML: ``fisher_arithmetic:gamma=0.2``, ``fisher_ties:normalize=true``."""
        kind = pipeline.store_kind(row)
        stores = [self.store(t, kind, tasks) for t in tasks] if kind else []
        return pipeline.method_recipe(row, self.base, [self.expert(t) for t in tasks], stores)

    def searched_recipe(self, methods: str, tasks: Sequence[str]) -> dict[str, Any]:
        """``search --methods`` on each task's valid split (per-task objective): the recipe it
        picks. Every store each method may use is listed; the search chooses. Its report (every
        candidate's per-task valid losses) is kept beside the scores, and its pick is reused by
        a later scoring of the same search (a larger eval split)."""
        from mergekit_fisher.search import report

        record = self.root / f"search-{len(tasks)}-experts-{methods}{_suffix(self.kind)}.json"
        if record.exists():
            return json.loads(record.read_text())["best_recipe"]
        inputs = pipeline.search_inputs(
            self.base,
            [self.expert(t) for t in tasks],
            [self.store(t, "full", tasks) for t in tasks],
            [self.store(t, "gram", tasks) for t in tasks],
        )
        valid = [self.data(t, "valid") for t in tasks]
        result = pipeline.search_methods(
            inputs,
            valid,
            methods=methods,
            num_samples=SIZES["valid"],
            device=self.args.device,
            scratch=self.root,
        )
        LOG.info("seed %d %s search picked %s", self.seed, self.kind, result.best.label())
        write_text_atomic(record, json.dumps(report(result), indent=1))
        return result.best_recipe

    def done(self) -> dict[tuple[str, str], dict[str, Any]]:
        if not self.scores_file.exists():
            return {}
        rows = [json.loads(line) for line in self.scores_file.read_text().splitlines() if line]
        return {(r["setting"], r["row"]): r for r in rows}

    def score(self, setting: str, row: str, model_dir: Path, seconds: float = 0.0) -> None:
        tasks = SETTINGS[setting]
        items = {t: problems(self.args, t, self.args.split, self.seed) for t in tasks}
        scores = pipeline.score_model(
            model_dir, self.tokenizer, items, self.root, device=self.args.device
        )
        result: dict[str, Any] = {"setting": setting, "row": row, "merge_seconds": seconds}
        for task, s in scores.items():
            result[task] = {"accuracy": s.accuracy, "loss": s.loss, "n": s.n}
        with self.scores_file.open("a") as f:
            f.write(json.dumps(result) + "\n")
        LOG.info(
            "seed %d %s, %s calibration, %s: %s",
            self.seed,
            setting,
            self.kind,
            row,
            {t: round(result[t]["accuracy"], 3) for t in tasks},
        )

    def run(self) -> None:
        done = self.done()
        for setting in self.args.settings:
            tasks = SETTINGS[setting]
            if (setting, "base") not in done:
                self.score(setting, "base", self.base)
            for task in tasks:
                if (setting, f"expert {task}") not in done:
                    self.score(setting, f"expert {task}", self.expert(task))
            for row in self.args.rows:
                if (setting, row) in done:
                    continue
                name, _, methods = row.partition(":")
                recipe = (
                    self.searched_recipe(methods or "all", tasks)
                    if name == "searched"
                    else self.recipe(row, tasks)
                )
                # a merge directory of its own: two processes may work on one seed
                with tempfile.TemporaryDirectory(dir=self.root) as tmp:
                    out = Path(tmp) / "merged"
                    started = time.perf_counter()
                    pipeline.merge(recipe, out, seed=self.seed)
                    self.score(setting, row, out, time.perf_counter() - started)


Section = tuple[str, calibration.Kind]
"""A table of the report: (setting, calibration kind)."""
Found = dict[Section, dict[str, dict[str, list[float]]]]


def collect(args: argparse.Namespace) -> Found:
    """(setting, kind) -> row -> {"norm": [per seed], task: [per seed accuracy]} from the
    cache."""
    found: Found = {}
    for setting, kind in itertools.product(args.settings, args.calibration):
        tasks = SETTINGS[setting]
        for seed in args.seeds:
            path = scores_path(args, seed, kind)
            if not path.exists():
                continue
            results = {
                r["row"]: r
                for r in map(json.loads, path.read_text().splitlines())
                if r["setting"] == setting
            }
            if any(f"expert {t}" not in results for t in tasks):
                continue
            experts = {t: results[f"expert {t}"][t]["accuracy"] for t in tasks}
            for row, result in results.items():
                cell = found.setdefault((setting, kind), {}).setdefault(row, {})
                cell.setdefault("seed", []).append(seed)
                accuracy = {t: result[t]["accuracy"] for t in tasks}
                cell.setdefault("norm", []).append(pipeline.normalized(accuracy, experts))
                cell.setdefault("loss", []).append(
                    statistics.fmean(result[t]["loss"] for t in tasks)
                )
                cell.setdefault("problems", []).append(min(result[t]["n"] for t in tasks))
                for t in tasks:
                    cell.setdefault(t, []).append(result[t]["accuracy"])
    return found


def _mean(values: list[float]) -> str:
    spread = f" ± {_std(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{spread}"


def title(section: Section) -> str:
    """A section's name in headers and verdict lines: ``2 experts, generic calibration``."""
    setting, kind = section
    return f"{setting}, {kind} calibration"


def report(found: Found) -> str:
    """Markdown tables: per setting and calibration kind, each row's EM per task and normalized
    EM (mean ± std over the seeds it has), then the verdict lines."""
    lines = []
    for section, rows in found.items():
        tasks = SETTINGS[section[0]]
        seeds = max(len(cell["norm"]) for cell in rows.values())
        per_task = min(min(cell["problems"]) for cell in rows.values())
        about = f"{', '.join(tasks)}; {seeds} seed(s); {per_task} problems a task"
        lines += [
            f"\n### {title(section)} ({about})\n",
            "| model | "
            + " | ".join(f"EM {t}" for t in tasks)
            + " | answer loss | norm EM | seeds |",
            "| --- |" + " ---: |" * (len(tasks) + 3),
        ]
        for row in sorted(rows, key=lambda r: -statistics.fmean(rows[r]["norm"])):
            cells = [f"{statistics.fmean(rows[row][t]):.2f}" for t in tasks]
            loss = f"{statistics.fmean(rows[row]['loss']):.3f}"
            lines.append(
                f"| {row} | " + " | ".join(cells) + f" | {loss} | {_mean(rows[row]['norm'])} | "
                f"{len(rows[row]['norm'])} |"
            )
        lines += ["", *verdict(title(section), rows)]
    return "\n".join(lines)


def verdict(name: str, rows: dict[str, dict[str, list[float]]]) -> list[str]:
    """Issue 12's checks within one section ``name`` (a setting and calibration kind, issue
    23's goals per kind): our best method vs mergekit's best at defaults and vs
    task_arithmetic (rows with every seed), and the searched merge vs mergekit's best (over the
    seeds it has): mean paired difference and seeds ahead."""
    merges = {r: c for r, c in rows.items() if r != "base" and not r.startswith("expert")}
    per_seed = {r: dict(zip(c["seed"], c["norm"])) for r, c in merges.items()}
    seeds = max((len(v) for v in per_seed.values()), default=0)
    full = [r for r, v in per_seed.items() if len(v) == seeds and ":" not in r]

    def best(family: str) -> str | None:
        found = [r for r in full if pipeline.family(r) == family]
        return max(found, key=lambda r: statistics.fmean(per_seed[r].values()), default=None)

    def versus(a: str | None, b: str | None) -> str:
        if a not in per_seed or b not in per_seed:  # a row this cache does not hold
            return "n/a"
        shared = [s for s in per_seed[a] if s in per_seed[b]]
        diffs = [per_seed[a][s] - per_seed[b][s] for s in shared]
        mean_a = statistics.fmean(per_seed[a][s] for s in shared)
        mean_b = statistics.fmean(per_seed[b][s] for s in shared)
        ahead = [str(s) for s, d in zip(shared, diffs) if d > 0]
        return (
            f"{a} {mean_a:.3f} vs {b} {mean_b:.3f}: {statistics.fmean(diffs):+.3f} (ahead in "
            f"{len(ahead)}/{len(diffs)} seeds: {', '.join(ahead) or 'none'})"
        )

    theirs = best("mergekit")
    lines = [
        f"- {name}: our best vs mergekit's best at defaults: {versus(best('ours'), theirs)}",
        f"- {name}: our best vs task_arithmetic: {versus(best('ours'), 'task_arithmetic')}",
    ]
    if "searched" in per_seed:
        lines.append(f"- {name}: searched vs mergekit's best: {versus('searched', theirs)}")
    return lines


def chart(found: Found, path: Path) -> None:
    """Normalized EM per merge row at its defaults (± std over seeds), one panel per setting and
    calibration kind (``pipeline.draw_bars``). Parameter variants (``row:k=v``) stay in the
    tables."""
    panels = []
    for section, rows in found.items():
        merges = [r for r in rows if r != "base" and not r.startswith("expert") and ":" not in r]
        bars = {r: (statistics.fmean(rows[r]["norm"]), _std(rows[r]["norm"])) for r in merges}
        panels.append((f"SmolLM2-135M-Instruct, {title(section)}", bars))
    pipeline.draw_bars(panels, path)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if not args.report:
        for seed, kind in itertools.product(args.seeds, args.calibration):
            Bench(args, seed, kind).run()
    found = collect(args)
    print(report(found))
    if args.chart and found:
        chart(found, args.chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
