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

    from mergekit_fisher.demo.run import recipe

    base, a, b = (tmp_path / n for n in ("base", "a", "b"))
    for method in ("linear", "task_arithmetic", "ties", "fisher"):
        text = recipe(method, base, [a, b], [tmp_path / "fa", tmp_path / "fb"])
        config = MergeConfiguration.model_validate(yaml.safe_load(text))
        assert config.merge_method == method
        assert str(a) in text and "dtype: float32" in text
    assert "density: 0.5" in recipe("ties", base, [a, b])
    assert f"fisher: {tmp_path / 'fb'}" in recipe(
        "fisher", base, [a, b], [tmp_path / "fa", tmp_path / "fb"]
    )


def test_demo_command_help() -> None:
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--seeds" in result.output and "--out" in result.output


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
    from mergekit_fisher.demo.run import DemoSettings, format_table, model_rows, run_demo
    from mergekit_fisher.demo.train import TrainSettings

    settings = DemoSettings(
        seeds=1,
        base=TrainSettings(steps=40, lr=3e-3),
        expert=TrainSettings(steps=30, lr=1e-3),
        eval_size=40,
        calib_size=24,
        keep_models=True,
    )
    report = run_demo(tmp_path / "out", settings)

    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["verdict"]["text"] == report["verdict"]["text"]
    assert (tmp_path / "out" / "chart.png").stat().st_size > 1000
    rows = saved["rows"]
    assert rows == [r for r in model_rows(settings.granularities) if r in rows]
    assert {"base", "expert add", "expert rev", "linear", "task_arithmetic", "ties"} <= set(rows)
    assert "fisher (full)" in rows
    assert ("fisher (nodes)" in rows) != bool(saved["skipped"])
    (seed,) = saved["seeds"]
    for row in rows:
        for task in ("add", "rev"):
            score = seed["scores"][row][task]
            assert 0.0 <= score["accuracy"] <= 1.0 and score["loss"] > 0 and score["n"] == 40
        assert saved["summary"][row]["normalized_accuracy"]["values"]
    for row, merge in seed["merges"].items():
        assert any(f.endswith(".safetensors") for f in merge["files"]), row
        assert Path(merge["recipe"]).is_file()
        assert (Path(merge["output"]) / "config.json").is_file()
    fisher_recipe = Path(seed["merges"]["fisher (full)"]["recipe"]).read_text()
    assert "merge_method: fisher" in fisher_recipe
    table = format_table(saved)
    assert all(row in table for row in rows) and "verdict:" in table
    assert saved["verdict"]["best"] in rows
