"""The offline demo: task generators, the greedy evaluator, recipes, and a reduced end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from mergekit_fisher.cli import main
from mergekit_fisher.demo.evaluate import completion_nll, evaluate, greedy_answers
from mergekit_fisher.demo.tasks import (
    TASKS,
    VOCAB,
    Problem,
    encode,
    make_tokenizer,
    sample_problems,
    split_of,
    write_jsonl,
)

# --------------------------------------------------------------------------------------------
# Tasks and tokenizer


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_generators_are_deterministic_per_seed(task) -> None:  # type: ignore[no-untyped-def]
    a = sample_problems(task, "train", 50, seed=3, stream="x")
    assert a == sample_problems(task, "train", 50, seed=3, stream="x")
    assert a != sample_problems(task, "train", 50, seed=4, stream="x")
    assert a != sample_problems(task, "train", 50, seed=3, stream="y")


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_held_out_split_is_disjoint_from_training(task) -> None:  # type: ignore[no-untyped-def]
    train = {p.prompt for s in range(3) for p in sample_problems(task, "train", 2000, s, "t")}
    held = {p.prompt for s in range(3) for p in sample_problems(task, "eval", 500, s, "eval")}
    assert train and held and not train & held
    assert all(split_of(p) == "eval" for p in held)


def test_problems_are_correct() -> None:
    add, rev = TASKS
    for p in sample_problems(add, "train", 100, 0):
        a, b = p.prompt.rstrip("=").split("+")
        assert p.completion == f"{int(a) + int(b)}."
    for p in sample_problems(rev, "train", 100, 0):
        assert p.completion == p.prompt.rstrip(">")[::-1] + "."


def test_tokenizer_matches_encode_and_calibration_masks(tmp_path: Path) -> None:
    from mergekit_fisher.data import load_calibration_data

    tok = make_tokenizer()
    problems = [Problem("37+85=", "122."), Problem("badge>", "egdab.")]
    for p in problems:
        assert tok(p.prompt + p.completion)["input_ids"] == encode(p.prompt + p.completion)
    data = load_calibration_data([str(write_jsonl(problems, tmp_path / "c.jsonl"))], tok)
    for p, ex in zip(problems, data.examples):
        targets = [i for i, m in zip(ex.input_ids, ex.target_mask) if m]
        assert targets == encode(p.completion, bos=False)


# --------------------------------------------------------------------------------------------
# Greedy evaluator on a hand-made model


class ScriptedModel(torch.nn.Module):
    """Predicts, at every position, the next character of a scripted answer to its prompt."""

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers = answers
        self.id_to_char = {i: c for c, i in VOCAB.items()}

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, len(VOCAB))
        for row, ids in enumerate(input_ids.tolist()):
            text = "".join(self.id_to_char[i] for i in ids[1:])
            for pos in range(len(ids)):
                prefix = text[:pos]
                prompt = next((p for p in self.answers if prefix.startswith(p)), None)
                if prompt is None:
                    continue
                done = prefix[len(prompt) :]
                answer = self.answers[prompt]
                nxt = answer[len(done)] if len(done) < len(answer) else "."
                logits[row, pos, VOCAB[nxt]] = 30.0
        return SimpleNamespace(logits=logits)


def test_greedy_evaluator_on_a_scripted_model() -> None:
    model = ScriptedModel({"1+2=": "3.", "ab>": "ba.", "4+4=": "9.", "cd>": "dcbaj"})
    problems = [
        Problem("1+2=", "3."),
        Problem("ab>", "ba."),
        Problem("4+4=", "8."),
        Problem("cd>", "dc."),
    ]
    answers = greedy_answers(model, [p.prompt for p in problems], max_new_tokens=4, batch_size=1)
    assert answers[0] == encode("3.", bos=False)
    assert answers[2] == encode("9.", bos=False)
    assert answers[3] == encode("dcba", bos=False)  # no terminator within the budget: cut
    score = evaluate(model, problems)
    assert score.accuracy == pytest.approx(0.5) and score.n == 4
    perfect = completion_nll(model, problems[:2])
    assert perfect < 1e-6
    assert completion_nll(model, problems) > perfect


# --------------------------------------------------------------------------------------------
# Recipes and the command


def test_recipes_are_valid_mergekit_configs(tmp_path: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration

    from mergekit_fisher.demo.rows import MERGES, SPECS
    from mergekit_fisher.demo.run import recipe, recipe_text

    base, a, b = (tmp_path / n for n in ("base", "a", "b"))
    stores = {
        kind: [tmp_path / f"{kind}-a", tmp_path / f"{kind}-b"] for kind in ("full", "nodes", "gram")
    }
    stores["base"] = [tmp_path / "base-full"]
    for row in (r for r in MERGES if SPECS[r].search != "methods"):
        config = recipe(row, base, [a, b], stores)
        text = recipe_text(config)
        parsed = MergeConfiguration.model_validate(yaml.safe_load(text))
        assert parsed.merge_method == SPECS[row].method
        assert str(a) in text and "dtype: float32" in text
    assert recipe("ties", base, [a, b])["models"][0]["parameters"]["density"] == 0.5
    fisher = recipe("fisher (nodes)", base, [a, b], stores)["models"]
    assert [m["parameters"]["fisher"] for m in fisher] == [str(p) for p in stores["nodes"]]
    # The anchor is the base with its own store, listed last (search keeps the first weight).
    anchored = recipe("fisher+base", base, [a, b], stores)
    assert anchored["base_model"] == str(base)
    assert anchored["models"][-1] == {
        "model": str(base),
        "parameters": {"weight": 1.0, "fisher": str(stores["base"][0])},
    }
    assert anchored == recipe("fisher+base (searched)", base, [a, b], stores)
    plain = recipe("fisher (full)", base, [a, b], stores)
    assert plain == recipe("fisher (searched)", base, [a, b], stores)
    assert "base_model" not in plain and len(plain["models"]) == 2
    regmean = recipe("regmean", base, [a, b], stores)["models"]
    assert [m["parameters"]["gram"] for m in regmean] == [str(p) for p in stores["gram"]]
    # mergekit's dare_ties trims nothing at its default density 1.0; karcher takes no weight.
    dare = recipe("dare_ties", base, [a, b], stores)
    assert dare["base_model"] == str(base)
    assert [m["parameters"] for m in dare["models"]] == [{"weight": 1.0, "density": 0.5}] * 2
    assert recipe("karcher", base, [a, b]) == {
        "merge_method": "karcher",
        "models": [{"model": str(a)}, {"model": str(b)}],
        "dtype": "float32",
    }
    # The task-vector Fisher methods: a store-less base_model, each expert's full store, and
    # the methods' own defaults (gamma 1, density 1.0, normalize).
    for row in ("fisher_arithmetic", "fisher_ties"):
        config = recipe(row, base, [a, b], stores)
        assert config["base_model"] == str(base) and "parameters" not in config
        assert [m["parameters"] for m in config["models"]] == [
            {"weight": 1.0, "fisher": str(p)} for p in stores["full"]
        ]
    # `search --methods` starts from the base and every store of each expert.
    assert recipe("search (all methods)", base, [a, b], stores) == {
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"fisher": str(f), "gram": str(g)}}
            for m, f, g in zip((a, b), stores["full"], stores["gram"])
        ],
        "dtype": "float32",
    }


def test_mixture_alternates_and_truncates() -> None:
    from mergekit_fisher.demo.run import _mixture

    add, rev = (sample_problems(t, "train", 4, 0) for t in TASKS)
    mixed = _mixture([add, rev], 5)
    assert mixed == [add[0], rev[0], add[1], rev[1], add[2]]
    with pytest.raises(ValueError):
        _mixture([add, rev], 9)


def _summary(norm: dict[str, list[float]]) -> tuple[dict, list[dict]]:  # type: ignore[type-arg]
    from mergekit_fisher.demo.report import summarize

    n = len(next(iter(norm.values())))
    seeds = []
    for i in range(n):
        score = {t.name: {"accuracy": 0.5, "loss": 1.0, "n": 1} for t in TASKS}
        seeds.append(
            {
                "scores": {row: score for row in norm},
                "normalized_accuracy": {row: v[i] for row, v in norm.items()},
            }
        )
    return summarize(seeds, list(norm)), seeds


def test_verdict_is_honest_whoever_wins() -> None:
    from mergekit_fisher.demo.report import verdict

    norm = {
        "base": [0.4, 0.4, 0.4],
        "expert add": [0.5] * 3,
        "expert rev": [0.5] * 3,
        "linear": [0.3, 0.4, 0.2],
        "fisher+base": [0.6, 0.3, 0.45],
        "regmean": [0.2, 0.1, 0.1],
    }
    v = verdict(*_summary(norm), regime="forget")
    assert v["best"] == "fisher+base" and v["seeds_ahead_of_linear"]["fisher+base"] == 2
    assert v["margin_over_linear"] == pytest.approx(0.15)
    assert v["text"].startswith("forget: fisher+base won")
    assert (
        "ahead of linear in 2/3 seeds" in v["text"] and "regmean 0.133 (-0.167, 0/3)" in v["text"]
    )
    assert "runner-up linear 0.300, fisher+base ahead of it in 2/3 seeds" in v["text"]
    assert "(fisher+base is above it, ahead in 2/3 seeds; 1/3 merges are above it)" in v["text"]

    norm["linear"] = [0.9, 0.9, 0.9]
    v = verdict(*_summary(norm), regime="close")
    assert v["best"] == "linear" and v["margin_over_linear"] == 0
    assert v["text"].startswith("close: linear won")
    assert "ahead of fisher+base (0.450; ahead of it in 3/3 seeds)" in v["text"]
    assert v["seeds_ahead_of_linear"] == {"fisher+base": 0, "regmean": 0}


def test_overall_line_says_when_no_merge_wins_everywhere() -> None:
    from mergekit_fisher.demo.report import overall, regime_part

    norm = {
        "base": [0.4, 0.4],
        "expert add": [0.5] * 2,
        "expert rev": [0.5] * 2,
        "linear": [0.3, 0.3],
        "fisher+base": [0.6, 0.5],
        "regmean": [0.2, 0.1],
    }
    forget = regime_part(_summary(norm)[1], list(norm), {}, "forget")
    assert overall({"forget": forget}) == ""
    norm["regmean"] = [0.9, 0.9]
    close = regime_part(_summary(norm)[1], list(norm), {}, "close")
    line = overall({"close": close, "forget": forget})
    assert line.startswith("overall: no merge is best in every regime (close: regmean 0.900")
    assert "(ranks 3/3 in forget)" in line and "fisher+base 0.550 (ranks 2/3 in close)" in line
    assert "mergekit-fisher search" in line
    assert overall({"a": forget, "b": forget}).startswith(
        "overall: fisher+base is the best merge in every regime"
    )


@pytest.mark.parametrize("matplotlib", [True, False], ids=["with", "without"])
def test_report_is_saved_before_the_chart_and_survives_no_matplotlib(
    matplotlib: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`pip install mergekit-fisher` has no matplotlib: the demo must still write report.json."""
    import sys

    from mergekit_fisher.demo.report import format_report, regime_part, save

    norm = {"base": [0.4], "expert add": [0.5], "expert rev": [0.5], "linear": [0.3]}
    summary, seeds = _summary(norm)
    part = regime_part(seeds, list(summary), {"steps": 10, "lr": 1e-3}, "close")
    report = {
        "tasks": [{"name": t.name} for t in TASKS],
        "seeds": [{"seed": 0}],
        "regimes": {"close": part},
        "skipped": ["fisher (nodes): the estimator does not implement it"],
    }
    if not matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    save(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["regimes"]["close"]["verdict"]["best"] == "linear"
    assert (tmp_path / "chart.png").exists() == matplotlib
    assert (
        saved["chart"] == report["chart"] == (str(tmp_path / "chart.png") if matplotlib else None)
    )
    hint = 'pip install "mergekit-fisher[demo]"'
    assert (hint in caplog.text) != matplotlib
    assert format_report(report).endswith(
        "skipped: fisher (nodes): the estimator does not implement it"
    )


def test_demo_command_prints_the_report_and_where_it_went(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergekit_fisher.demo import run

    seen = {}

    def fake_run_demo(out: str, settings: object) -> dict:  # type: ignore[type-arg]
        seen["settings"] = settings
        return {"chart": None, "skipped": ["a note"]}

    monkeypatch.setattr(run, "run_demo", fake_run_demo)
    monkeypatch.setattr("mergekit_fisher.demo.report.format_table", lambda report: "TABLE")
    out = str(tmp_path / "o")
    args = ["demo", "--toy", "--out", out, "--seeds", "2", "--regime", "close"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("TABLE\nskipped: a note\nreport: ")
    assert (
        f"report: {out}/report.json  wall time: " in result.output and "chart:" not in result.output
    )
    assert seen["settings"].seeds == 2 and seen["settings"].regimes == ("close",)


def test_demo_command_help() -> None:
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--seeds" in result.output and "--out" in result.output
    assert "--regime" in result.output and "[close|forget|both]" in result.output


# --------------------------------------------------------------------------------------------
# A reduced demo, end to end


def _estimator_available() -> bool:
    try:
        from mergekit_fisher import estimate_fisher  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _estimator_available(), reason="mergekit_fisher.estimate_fisher missing")
def test_reduced_demo_end_to_end(tmp_path: Path) -> None:
    from mergekit_fisher.demo.report import format_table
    from mergekit_fisher.demo.rows import MERGES, model_rows
    from mergekit_fisher.demo.run import REGIMES, DemoSettings, run_demo
    from mergekit_fisher.demo.train import TrainSettings

    settings = DemoSettings(
        seeds=1,
        base=TrainSettings(steps=40, lr=3e-3),
        close=TrainSettings(steps=10, lr=3e-4),
        forget=TrainSettings(steps=30, lr=1e-3),
        eval_size=40,
        calib_size=24,
        search_samples=16,
        keep_models=True,
    )
    report = run_demo(tmp_path / "out", settings)

    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (tmp_path / "out" / "chart.png").stat().st_size > 1000
    assert list(saved["regimes"]) == list(REGIMES)
    table = format_table(saved)
    assert table == format_table(report)
    for regime, part in saved["regimes"].items():
        assert part["verdict"]["text"] == report["regimes"][regime]["verdict"]["text"]
        assert part["verdict"]["text"].startswith(f"{regime}: ")
        assert part["expert_training"]["steps"] == settings.expert_training(regime).steps
        rows = part["rows"]
        assert rows == [r for r in model_rows(settings.granularities) if r in rows]
        assert {"base", "expert add", "expert rev"} | set(MERGES) - {"fisher (nodes)"} <= set(rows)
        assert ("fisher (nodes)" in rows) != bool(saved["skipped"])
        (seed,) = part["seeds"]
        assert list(seed["scores"]) == rows
        for row in rows:
            for task in ("add", "rev"):
                score = seed["scores"][row][task]
                assert 0.0 <= score["accuracy"] <= 1.0 and score["loss"] > 0 and score["n"] == 40
            assert part["summary"][row]["normalized_accuracy"]["values"]
        for row, merge in seed["merges"].items():
            assert any(f.endswith(".safetensors") for f in merge["files"]), row
            assert Path(merge["recipe"]).is_file()
            assert (Path(merge["output"]) / "config.json").is_file()
        recipes = {row: Path(m["recipe"]).read_text() for row, m in seed["merges"].items()}
        assert "merge_method: fisher" in recipes["fisher (full)"]
        assert "merge_method: regmean" in recipes["regmean"] and "gram: " in recipes["regmean"]
        assert "base_model: " in recipes["fisher+base"]
        assert "merge_method: karcher" in recipes["karcher"]
        assert "density: 0.5" in recipes["dare_ties"] and "base_model: " in recipes["dare_ties"]
        for row in ("fisher_arithmetic", "fisher_ties"):
            assert f"merge_method: {row}" in recipes[row] and "fisher: " in recipes[row]
        # A searched row merges the best candidate of its grid scored on `valid`: the rev
        # expert's weight (3), times the base's strength when anchored (3 x 3).
        searched = {"fisher (searched)": 3, "fisher+base (searched)": 9}
        assert set(seed["search"]) == {*searched, "search (all methods)"}
        _check_methods_search(seed["search"]["search (all methods)"], recipes, table)
        for row, candidates in searched.items():
            search = seed["search"][row]
            assert search["held_out"] == "valid" and len(search["candidates"]) == candidates
            full = [c["loss"] for c in search["candidates"] if not c["pruned"]]
            assert search["best"]["loss"] == min(full)  # a pruned one's loss is its first rows
            best = search["best"]["weights"]
            models = recipes[row].split("\n- model")
            assert len(models) == len(best) + 1
            for model, weight in zip(models[1:], best, strict=True):
                assert f"weight: {weight}" in model
            assert f"search for {row} (" in table
        assert part["verdict"]["best"] in rows
        assert all(row in table for row in rows)
    assert saved["seeds"][0]["shared_timings_s"]["estimate_base"] >= 0
    assert "verdict: close: " in table and "verdict: forget: " in table


def _check_methods_search(record: dict, recipes: dict[str, str], table: str) -> None:  # type: ignore[type-arg]
    """The ``search --methods all`` row: every method's default grid scored per task on
    ``valid``, mergekit's own methods among them; the lowest objective is the recipe merged."""
    from mergekit_fisher.search import METHOD_GRIDS

    candidates = record["candidates"]
    assert {c["method"] for c in candidates} == set(METHOD_GRIDS)
    assert sum(len(g.points) for g in METHOD_GRIDS.values()) == len(candidates)
    for c in candidates:
        assert set(c["losses"]) == {"add-valid", "rev-valid"}
        assert c["loss"] == pytest.approx(sum(c["losses"].values()) / 2, abs=2e-6)
    best = min((c for c in candidates if not c["pruned"]), key=lambda c: c["loss"])
    assert record["best"] == best
    assert f"merge_method: {best['method']}" in recipes["search (all methods)"]
    assert f"search for search (all methods) ({len(candidates)} candidates" in table
    assert best["label"] in table


@pytest.mark.skipif(not _estimator_available(), reason="mergekit_fisher.estimate_fisher missing")
def test_demo_refuses_an_unknown_regime(tmp_path: Path) -> None:
    from mergekit_fisher.demo.run import DemoSettings, run_demo

    with pytest.raises(ValueError, match="unknown regime 'far'"):
        run_demo(tmp_path / "out", DemoSettings(regimes=("far",)))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not _estimator_available(), reason="mergekit_fisher.estimate_fisher missing")
def test_seeds_side_by_side_give_the_same_numbers(tmp_path: Path) -> None:
    """``workers`` runs seeds in spawned processes: every score is the one a single process
    computes, and seeds come back in order."""
    from mergekit_fisher.demo.run import DemoSettings, run_demo
    from mergekit_fisher.demo.train import TrainSettings

    def settings(workers: int) -> DemoSettings:
        return DemoSettings(
            seeds=2,
            regimes=("close",),
            base=TrainSettings(steps=20, lr=3e-3),
            close=TrainSettings(steps=5, lr=3e-4),
            eval_size=16,
            calib_size=16,
            search_samples=8,
            granularities=("full",),
            workers=workers,
        )

    alone = run_demo(tmp_path / "one", settings(1))["regimes"]["close"]
    side_by_side = run_demo(tmp_path / "two", settings(2))["regimes"]["close"]
    assert [s["seed"] for s in side_by_side["seeds"]] == [0, 1]
    assert [s["scores"] for s in side_by_side["seeds"]] == [s["scores"] for s in alone["seeds"]]
