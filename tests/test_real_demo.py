"""The main demo on the real model: recipes, the bootstrap verdict, the command, and a tiny run
end to end (a fine-tune step, a handful of problems, two methods, a one-candidate search).

The end-to-end tests are skipped, with the install line, where SmolLM2 is not installed;
`make test` installs it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_recipe

from mergekit_fisher.cli import main
from mergekit_fisher.real import pipeline
from mergekit_fisher.real.verdict import compare, how_sure, resampled

# --------------------------------------------------------------------------------------------
# Recipes and the verdict, without the model


@pytest.mark.parametrize("row", ["linear", "task_arithmetic", "ties", "dare_ties", "fisher"])
def test_method_recipe_at_defaults(row: str) -> None:
    stores = [Path("s1"), Path("s2")] if pipeline.store_kind(row) else []
    recipe = pipeline.method_recipe(row, Path("base"), [Path("a"), Path("b")], stores)
    assert recipe["merge_method"] == row and recipe["dtype"] == "float32"
    assert ("base_model" in recipe) == (row not in pipeline.NO_BASE)
    for model, store in zip(recipe["models"], stores or [None, None]):
        params = model["parameters"]
        assert params["weight"] == 1.0
        assert params.get("density") == pipeline.TRIMS.get(row)
        assert params.get("fisher") == (str(store) if store else None)


def test_method_recipe_reads_shared_parameters_and_node_stores() -> None:
    recipe = pipeline.method_recipe(
        "fisher_arithmetic_nodes:gamma=0.2", Path("b"), [Path("e")], [Path("n")]
    )
    assert recipe["merge_method"] == "fisher_arithmetic" and recipe["parameters"] == {"gamma": 0.2}
    assert recipe["models"][0]["parameters"]["fisher"] == "n"
    assert pipeline.store_kind("regmean") == "gram" and pipeline.store_kind("ties") is None
    assert pipeline.family("searched: fisher_ties weight=1.0 density=1.0 normalize=True") == (
        "searched"
    )
    assert pipeline.family("fisher_ties") == "ours" and pipeline.family("dare_ties") == "mergekit"


def test_normalized_divides_by_each_tasks_expert() -> None:
    assert pipeline.normalized({"a": 0.4, "b": 0.9}, {"a": 0.8, "b": 0.9}) == pytest.approx(0.75)


def _hits(**rows: list[int]) -> dict[str, dict[str, list[int]]]:
    """Rows of one task ``t`` with the given per-problem hits, plus its expert."""
    return {"expert t": {"t": [1] * 40}} | {row: {"t": hits} for row, hits in rows.items()}


def test_bootstrap_is_paired_and_says_how_sure() -> None:
    samples = resampled(_hits(a=[1] * 30 + [0] * 10, b=[1] * 20 + [0] * 20), {"t": "expert t"}, 500)
    norm = {"a": 0.75, "b": 0.5}
    found = compare("a", "b", norm, samples)
    assert found.ahead > 0.975 and "clearly ahead" in found.text()
    assert "ahead in 100% of 500 paired resamples" in found.text()
    same = resampled(_hits(a=[1, 0] * 20, b=[1, 0] * 20), {"t": "expert t"}, 200)
    tie = compare("a", "b", {"a": 0.5, "b": 0.5}, same)
    assert tie.ahead == tie.behind == 0.0 and "level in 100%" in tie.text()
    assert how_sure(0.1, 0.85) == "probably behind" and how_sure(0.5, 0.4) == "too close to call"
    # one problem apart out of 40: the bootstrap cannot tell
    close = resampled(_hits(a=[1] * 21 + [0] * 19, b=[1] * 20 + [0] * 20), {"t": "expert t"}, 500)
    assert "too close to call" in compare("a", "b", {"a": 0.525, "b": 0.5}, close).text()


# --------------------------------------------------------------------------------------------
# The command


def test_toy_options_need_toy() -> None:
    result = CliRunner().invoke(main, ["demo", "--seeds", "2"])
    assert result.exit_code == 2 and "options of --toy" in result.output


def test_demo_help_says_what_and_how_long() -> None:
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "SmolLM2-135M-Instruct" in text
    assert re.search(r"about \d+ minutes on 2 idle cores", text)
    assert "--toy" in text and "--seeds" in text and "--sizes" not in text


def test_demo_command_passes_its_knobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_fisher.real import demo

    seen: dict[str, Any] = {}

    def fake_run(out: str, settings: object) -> dict[str, Any]:
        seen["settings"] = settings
        return {"chart": None, "wall_time_s": 1.0}

    monkeypatch.setattr(demo, "run_real_demo", fake_run)
    monkeypatch.setattr(demo, "format_report", lambda report: "TABLE")
    out = str(tmp_path / "o")
    args = ["--out", out, "--steps", "2", "--sizes", "8,4,4,6", "--rows", "linear,regmean"]
    result = CliRunner().invoke(main, ["demo", *args, "--search-methods", "linear"])
    assert result.exit_code == 0, result.output
    assert result.output == f"TABLE\nreport: {out}/report.json  wall time: 1 s\n"
    settings = seen["settings"]
    assert settings.training.steps == 2 and settings.training.lr == 5e-5
    assert (settings.train_size, settings.calib_size, settings.eval_size) == (8, 4, 6)
    assert settings.rows == ("linear", "regmean") and settings.search == "linear"


# --------------------------------------------------------------------------------------------
# A tiny run end to end


def _tiny() -> Any:
    from mergekit_fisher.demo.train import TrainSettings
    from mergekit_fisher.real.demo import RealDemoSettings

    return RealDemoSettings(
        training=TrainSettings(steps=1, lr=5e-5, batch_size=4, warmup=1),
        train_size=8,
        calib_size=4,
        valid_size=4,
        eval_size=6,
        rows=("linear", "fisher_ties"),
        search="linear",
        resamples=200,
        threads=1,
    )


@pytest.fixture(scope="module")
def tiny_run(smol: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from mergekit_fisher.real import smollm2
    from mergekit_fisher.real.demo import run_real_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(smollm2.CACHE_ENV, str(smol.parent))
        return out, run_real_demo(out, _tiny())


@pytest.mark.slow
def test_tiny_run_report(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    from mergekit_fisher.real.demo import format_report

    out, report = tiny_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    rows = list(report["rows"])
    assert rows[:5] == ["base", "expert acronym", "expert max", "linear", "fisher_ties"]
    assert rows[5] == "searched: linear weight=1.0" and report["search"]["best"] in rows[5]
    for entry in report["rows"].values():
        for score in entry["scores"].values():
            assert score["n"] == len(score["hits"]) == 6
            assert score["accuracy"] == pytest.approx(sum(score["hits"]) / 6)
    assert report["rows"]["linear"]["recipe"]["merge_method"] == "linear"
    assert set(report["timings_s"]) == {
        "base model",
        "fine-tune experts",
        "estimate stores",
        "score base and experts",
        "merge every method",
        "search --methods",
    }
    text = format_report(report)
    assert "verdict: our best at defaults vs mergekit's best at defaults: fisher_ties " in text
    assert " vs linear " in text and "of 200 paired resamples: " in text
    assert "12 held-out problems" in text
    if report["chart"]:
        assert Path(report["chart"]).stat().st_size > 0


@pytest.mark.slow
def test_linear_row_is_the_merged_model(
    smol: Path, tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The table's numbers come from the merge: an independent linear merge of the demo's
    experts, scored on the same problems, gives the row's hits and loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_fisher.real import chat_model, chat_tasks

    out, report = tiny_run
    experts = sorted((out / "cache").glob("*/expert-*"))
    assert [e.name for e in experts] == ["expert-acronym", "expert-max"]
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
        "dtype": "float32",
    }
    run_recipe(recipe, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    tokenizer = AutoTokenizer.from_pretrained(smol)
    for task, row in report["rows"]["linear"]["scores"].items():
        mine = chat_model.score(model, tokenizer, chat_tasks.problems(task, "eval", 6), tmp_path)
        assert [int(h) for h in mine.hits] == row["hits"]
        assert mine.loss == pytest.approx(row["loss"], rel=1e-5)


@pytest.mark.slow
def test_rerun_reuses_the_cache(smol: Path, tiny_run: tuple[Path, dict[str, Any]]) -> None:
    from mergekit_fisher.real import smollm2
    from mergekit_fisher.real.demo import run_real_demo

    out, first = tiny_run
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(smollm2.CACHE_ENV, str(smol.parent))
        again = run_real_demo(out, _tiny())
    assert time.perf_counter() - started < 30
    assert again["rows"] == json.loads(json.dumps(first["rows"]))
    assert np.isclose(
        again["verdict"]["ours_vs_mergekit"]["share_ahead"],
        first["verdict"]["ours_vs_mergekit"]["share_ahead"],
    )
