"""The demo's report: per-seed scores -> summaries, verdicts, tables, report.json and the chart.

report.json is written before the chart, and the chart is skipped (one log line) when
matplotlib is missing: it is an optional extra (``pip install "mergekit-fisher[demo]"``), and
a finished run must never lose its report to it.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_fisher.demo.rows import SPECS
from mergekit_fisher.demo.tasks import TASKS
from mergekit_fisher.store import write_text_atomic

logger = logging.getLogger(__name__)


def normalized(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Each row's accuracy on each task over that task's expert's, averaged over the tasks."""
    out = {}
    for row, by_task in scores.items():
        ratios = []
        for t in TASKS:
            expert = scores[f"expert {t.name}"][t.name]["accuracy"]
            ratios.append(by_task[t.name]["accuracy"] / expert if expert > 0 else 0.0)
        out[row] = sum(ratios) / len(ratios)
    return out


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


def overall(parts: Mapping[str, Mapping[str, Any]]) -> str:
    """One line across regimes: whether one merge is best in all of them, and if not, each
    regime's best with its rank in the others, so no single-regime win reads as general."""
    if len(parts) < 2:
        return ""
    verdicts = {regime: part["verdict"] for regime, part in parts.items()}
    bests = {v["best"] for v in verdicts.values()}
    hint = "compare candidates on your own held-out data with `mergekit-fisher search`"
    if len(bests) == 1:
        return f"overall: {bests.pop()} is the best merge in every regime; {hint}"

    def rank(row: str, regime: str) -> str:
        ranking = verdicts[regime]["ranking"]
        return f"{ranking.index(row) + 1}/{len(ranking)} in {regime}" if row in ranking else ""

    wins = []
    for regime, v in verdicts.items():
        elsewhere = ", ".join(rank(v["best"], other) for other in verdicts if other != regime)
        wins.append(f"{regime}: {v['best']} {v['best_mean']:.3f} (ranks {elsewhere})")
    return (
        "overall: no merge is best in every regime (" + "; ".join(wins) + "): which one wins "
        f"depends on how far the experts moved from their base; {hint}"
    )


def _table(summary: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    headers = ["model", *(f"acc {n}" for n in names), *(f"loss {n}" for n in names), "norm acc"]
    keys = [
        *(f"accuracy_{n}" for n in names),
        *(f"loss_{n}" for n in names),
        "normalized_accuracy",
    ]
    body = [headers]
    for row, metrics in summary.items():
        cells = [f"{metrics[k]['mean']:.3f} ± {metrics[k]['std']:.3f}" for k in keys]
        body.append([row, *cells])
    return aligned(body)


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table: the first row is the header, then a rule, columns padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def _search_lines(part: Mapping[str, Any]) -> list[str]:
    """What each search chose in each seed: coefficients (and whether at the grid's edge), or
    the method and its parameters."""
    lines = []
    for row in SPECS:
        runs = [(s["seed"], s["search"][row]) for s in part["seeds"] if row in s.get("search", {})]
        if not runs:
            continue
        records = [r for _, r in runs]
        if SPECS[row].search == "methods":
            chosen = ", ".join(f"seed {seed}: {r['best']['label']}" for seed, r in runs)
            count = len(records[0]["candidates"])
            lines.append(f"search for {row} ({count} candidates; valid loss per task): {chosen}")
            continue
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
    if line := overall(report["regimes"]):
        lines += [line, ""]
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


def regime_part(
    seeds: list[dict[str, Any]], rows: list[str], training: dict[str, Any], regime: str
) -> dict[str, Any]:
    """One regime's part of the report: its seeds, their summary over ``rows`` and the verdict."""
    summary = summarize(seeds, rows)
    return {
        "expert_training": training,
        "rows": rows,
        "seeds": seeds,
        "summary": summary,
        "verdict": verdict(summary, seeds, regime),
    }


def format_report(report: dict[str, Any]) -> str:
    """The tables and verdicts, then a line per merge row the run had to skip."""
    return "\n".join([format_table(report), *(f"skipped: {note}" for note in report["skipped"])])


def save(
    report: dict[str, Any],
    out: Path,
    draw: Callable[[dict[str, Any], Path], Path] | None = None,
) -> None:
    """Write report.json, then chart.png by ``draw`` (the toy's ``chart`` unless told), recorded
    as ``report["chart"]`` (None when skipped).

    The JSON goes first, so that a missing matplotlib or a failing chart never loses the run;
    each file is written whole or not at all.
    """
    report["chart"] = None
    _write_json(report, out / "report.json")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning(
            'chart.png skipped: matplotlib is not installed (pip install "mergekit-fisher[demo]")'
        )
        return
    report["chart"] = str((draw or chart)(report, out / "chart.png"))
    _write_json(report, out / "report.json")


def _write_json(report: dict[str, Any], path: Path) -> None:
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
