"""The steps of a merge experiment on the real model, in one place for the demo and the benchmark.

Fine-tuning an expert, estimating its stores, building a method's recipe at its defaults,
searching, merging, scoring a model per task and normalized exact match: the main demo
(``real.demo``) and ``scripts/bench_quality_real.py`` both call these, so that the demo shows
exactly what the benchmark measures. Experts and stores are cached by directory (a complete one
is reused, a crash leaves none behind).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergekit_fisher.demo.train import TrainSettings
from mergekit_fisher.real import chat_model, chat_tasks
from mergekit_fisher.real.chat_model import GENTLE, ChatScore

if TYPE_CHECKING:
    from mergekit_fisher.search import SearchResult

LOG = logging.getLogger(__name__)

MERGEKIT_ROWS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "della",
    "karcher",
    "model_stock",
)
OUR_ROWS = (
    "fisher",
    "fisher_nodes",
    "regmean",
    "fisher_arithmetic",
    "fisher_arithmetic_nodes",
    "fisher_ties",
)
TRIMS = {"ties": 0.5, "dare_ties": 0.5, "della": 0.5}
"""Density of the trimming methods: mergekit's default (1.0) trims nothing, so its README's 0.5."""
STORES = {
    "fisher": "full",
    "fisher_nodes": "nodes",
    "regmean": "gram",
    "fisher_arithmetic": "full",
    "fisher_arithmetic_nodes": "nodes",
    "fisher_ties": "full",
}
"""The store kind (``estimate`` granularity, or ``gram``) each of our rows reads."""
SIZES = {"train": 480, "calib": 64, "valid": 64, "eval": 100}
"""Problems a task per split: fixed before any merge was scored."""
NO_BASE = ("linear", "karcher", "fisher", "regmean")
"""Methods that average the experts themselves: no ``base_model``."""


def load_model(path: Path, device: str = "cpu") -> torch.nn.Module:
    """A model directory in float32 (a gentle fine-tune's task vector is below bf16's ulp)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


def finetune_expert(
    base: Path,
    task: str,
    out: Path,
    *,
    seed: int,
    settings: TrainSettings = GENTLE,
    train_size: int = SIZES["train"],
    device: str = "cpu",
) -> Path:
    """``task``'s expert: ``base`` fully fine-tuned on ``train_size`` train problems, saved to
    ``out`` in float32; an existing complete ``out`` is reused as it is."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoTokenizer

    from mergekit_fisher.store import atomic_directory

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_model(base, device)
    items = chat_tasks.problems(task, "train", train_size, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    examples = chat_model.tokenize(tokenizer, items, out.parent)
    chat_model.finetune(model, examples, settings, seed, tokenizer.pad_token_id, task)
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def estimate_store(
    expert: Path, calib: Path, out: Path, kind: str, *, seed: int, device: str = "cpu"
) -> Path:
    """``expert``'s store of ``kind`` (``full``/``nodes`` Fisher, ``gram``) on ``calib``,
    through the public ``estimate`` API; an existing complete ``out`` is reused."""
    if (out / "fisher_config.json").exists():
        return out
    from mergekit_fisher import estimate_fisher

    statistic = {"statistic": "gram"} if kind == "gram" else {"granularity": kind}
    estimate_fisher(
        model=str(expert),
        data=[str(calib)],
        out=str(out),
        max_length=128,
        batch_size=8,
        seed=seed,
        device=device,
        overwrite=True,
        progress=False,
        **statistic,
    )
    return out


def parse_row(row: str) -> tuple[str, dict[str, Any]]:
    """A row's name and shared parameters, each value read as YAML:
    ``fisher_arithmetic:gamma=0.2`` -> (``fisher_arithmetic``, {"gamma": 0.2})."""
    import yaml

    name, _, extra = row.partition(":")
    pairs = (kv.split("=") for kv in extra.split(",") if kv)
    return name, {k: yaml.safe_load(v) for k, v in pairs}


def store_kind(row: str) -> str | None:
    """The store kind ``row`` needs of each expert, or None (mergekit's methods)."""
    return STORES.get(parse_row(row)[0])


def method_recipe(
    row: str, base: Path, experts: Sequence[Path], stores: Sequence[Path] = ()
) -> dict[str, Any]:
    """``row``'s recipe at its documented defaults: weight 1 per expert, density 0.5 where a
    method trims, ``stores`` (one per expert, of ``store_kind(row)``) where it reads one."""
    name, shared = parse_row(row)
    method = name.removesuffix("_nodes")
    key = "gram" if method == "regmean" else "fisher"
    models = []
    for i, expert in enumerate(experts):
        params: dict[str, Any] = {"weight": 1.0}
        if name in STORES:
            params[key] = str(stores[i])
        if name in TRIMS:
            params["density"] = TRIMS[name]
        models.append({"model": str(expert), "parameters": params})
    recipe: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32"}
    if shared:
        recipe["parameters"] = shared
    if method not in NO_BASE:
        recipe["base_model"] = str(base)
    return recipe


def search_inputs(
    base: Path, experts: Sequence[Path], full: Sequence[Path], gram: Sequence[Path]
) -> dict[str, Any]:
    """What ``search --methods`` starts from: the base and each expert with every store it has
    (``full`` Fisher and ``gram``); each candidate method takes what it needs."""
    models = [
        {"model": str(e), "parameters": {"fisher": str(f), "gram": str(g)}}
        for e, f, g in zip(experts, full, gram, strict=True)
    ]
    return {"base_model": str(base), "models": models, "dtype": "float32"}


def search_methods(
    inputs: Mapping[str, Any],
    valid: Sequence[Path],
    *,
    methods: str = "all",
    num_samples: int = SIZES["valid"],
    device: str = "cpu",
    scratch: Path | None = None,
    **options: Any,
) -> SearchResult:
    """``search --methods`` (``+`` or ``,`` between names) on one valid file per task, so each
    task counts equally (the per-task objective); ``options`` go to ``search`` as they are."""
    from mergekit_fisher.search import parse_methods, search

    result = search(
        inputs,
        [str(p) for p in valid],
        methods=parse_methods(methods.replace("+", ",")),
        num_samples=num_samples,
        device=device,
        scratch=scratch,
        **options,
    )
    LOG.info("search picked %s", result.best.label())
    return result


def merge(recipe: Mapping[str, Any], out: Path, seed: int = 0) -> Path:
    """``recipe`` through mergekit's ``run_merge`` (what ``mergekit-yaml`` runs) into ``out``;
    torch seeded first, so that DARE drops the same weights in every run."""
    from mergekit_fisher.demo.run import merge as run_merge

    torch.manual_seed(seed)
    run_merge(recipe, out)
    return out


def score_model(
    model: Path | torch.nn.Module,
    tokenizer: Any,
    items: Mapping[str, Sequence[chat_tasks.Problem]],
    scratch: Path,
    device: str = "cpu",
) -> dict[str, ChatScore]:
    """Greedy exact match (per item too) and answer loss of ``model`` on each task's items."""
    loaded = load_model(model, device) if isinstance(model, Path) else model
    return {
        task: chat_model.score(loaded, tokenizer, problems, scratch)
        for task, problems in items.items()
    }


def normalized(accuracy: Mapping[str, float], expert: Mapping[str, float]) -> float:
    """Mean over ``expert``'s tasks of accuracy / that task's expert's accuracy on it (1.0:
    every expert kept whole)."""
    return statistics.fmean(accuracy[t] / max(expert[t], 1e-9) for t in expert)


def family(row: str) -> str:
    """``ours``, ``mergekit`` or ``searched``: who made the row's method (``searched: <pick>``
    rows carry the search's label, not parameters)."""
    name = row.partition(":")[0]
    if name == "searched":
        return "searched"
    return "ours" if name in OUR_ROWS else "mergekit"


COLORS = {"ours": "tab:orange", "mergekit": "tab:gray", "searched": "tab:blue"}


def draw_bars(panels: Sequence[tuple[str, Mapping[str, tuple[float, float]]]], path: Path) -> Path:
    """Horizontal bars of normalized exact match per merge row (``row -> (value, error)``), one
    panel per (title, rows): ours orange, mergekit's grey, the searched pick blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        names = sorted(rows, key=lambda r: rows[r][0])
        values, errors = zip(*(rows[r] for r in names)) if names else ((), ())
        ax.barh(names, values, xerr=errors, color=[COLORS[family(r)] for r in names])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("normalized exact match (1 = every expert kept)")
    handles = [Patch(color=c, label=f) for f, c in COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncols=len(handles))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)  # a crash mid-draw leaves no half picture
    return path
