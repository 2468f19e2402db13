"""Search: every candidate's per-source losses are those of the merged model, scored
independently; ``--methods`` builds each method's recipe from one recipe of all inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import fisher_recipe, make_store, run_recipe

from mergekit_fisher.search import (
    SearchError,
    SourceLoss,
    candidates_for,
    edge_warnings,
    method_candidates,
    objective,
    parse_grid,
    parse_methods,
    search,
)

pytestmark = pytest.mark.usefixtures("fresh_cache")


def naive_loss(model_dir: Path, texts: list[str]) -> float:
    """Per-example, unpadded next-token loss over all tokens after the first (float64)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return total / count


TEXTS = ["12+34=46", "abc def", "hello 77", "zz+1=zz1", "merge me 5", "q"]
LONG = ["the quick brown fox jumps over the lazy dog " * 3, "a much longer answer, 1234567890 " * 4]


def test_grid_parsing_and_candidates() -> None:
    grid = parse_grid(["weight=0.5,1,2", "epsilon=1e-8,0.001"])
    assert (
        grid == {"weight": [0.5, 1, 2], "epsilon": ["1e-8", 0.001]} or grid["epsilon"][1] == 0.001
    )
    recipe = {
        "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b"}, {"model": "c"}]
    }
    found = candidates_for(recipe, {"weight": [1, 2], "epsilon": [0, 1]})
    assert len(found) == 2 * 2 * 2 and all(c.weights[0] == 1.0 for c in found)
    applied = found[-1].recipe
    assert [m["parameters"]["weight"] for m in applied["models"]] == [1.0, 2.0, 2.0]
    assert applied["parameters"] == {"epsilon": 1}
    assert "parameters" not in recipe["models"][1]  # the input recipe is left alone
    per_model = candidates_for(recipe, {"weight.2": [0, 1, 2], "weight.1": [1]})
    assert [c.weights for c in per_model] == [(1.0, 1.0, 0.0), (1.0, 1.0, 1.0), (1.0, 1.0, 2.0)]
    assert edge_warnings(per_model[0], per_model) == [
        "weight.2=0.0 is at the edge of the searched values [0.0, 1.0, 2.0]: widen --grid"
    ]
    assert edge_warnings(per_model[1], per_model) == []
    with pytest.raises(SearchError, match=r"weight\.0 to weight\.2"):
        candidates_for(recipe, {"weight.3": [1]})
    with pytest.raises(SearchError, match="KEY=V1"):
        parse_grid(["weight"])
    with pytest.raises(SearchError, match="narrow"):
        candidates_for(recipe, {"weight": list(range(20))})


def test_search_scores_each_source_by_its_merged_models_loss(
    tmp_path: Path, tiny_llama_pair, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("\n".join(TEXTS))
    long.write_text("\n".join(LONG))
    recipe = fisher_recipe(models, stores, [1.0, 1.0])
    with caplog.at_level("INFO", logger="mergekit_fisher"):
        result = search(recipe, [str(short), str(long)], grid={"weight": [0.25, 4.0]}, batch_size=4)
    # Which store serves which model is said once, not once per candidate.
    for store in stores:
        assert caplog.text.count(f"<- Fisher store {store}") == 1
    assert len(result.candidates) == 2
    assert result.best.loss == min(c.loss for c in result.candidates)
    losses = {c.weights: c.loss for c in result.candidates}
    assert losses[(1.0, 0.25)] != pytest.approx(losses[(1.0, 4.0)])
    for scored in result.candidates:
        out = tmp_path / f"check-{scored.weights[1]}"
        run_recipe(scored.candidate.recipe, out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((models[0] / name).read_bytes())
        expected = [naive_loss(out, TEXTS), naive_loss(out, LONG)]
        assert [x.mean for x in scored.losses] == pytest.approx(expected, rel=1e-4)
        assert scored.loss == pytest.approx(sum(expected) / 2, rel=1e-4)  # each task counts 1/2


def test_objectives_weigh_tasks_equally_or_tokens() -> None:
    losses = [SourceLoss("a", nll=10.0, tokens=10), SourceLoss("b", nll=300.0, tokens=100)]
    assert objective(losses, "tasks") == pytest.approx((1.0 + 3.0) / 2)
    assert objective(losses, "tokens") == pytest.approx(310.0 / 110)
    with pytest.raises(SearchError, match="tasks, tokens, exact"):
        objective(losses, "words")


class _Oracle(torch.nn.Module):
    """Predicts each next token (logit 5 on it) except at one position per listed row, where
    it predicts the next token + 1: a model whose exact match is known by construction. Rows
    are numbered in the order the batches arrive."""

    def __init__(self, vocab: int, wrong: dict[int, int]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.wrong, self.seen = vocab, wrong, 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # type: ignore[no-untyped-def]
        nxt = torch.roll(input_ids, -1, dims=1)
        for b in range(input_ids.shape[0]):
            position = self.wrong.get(self.seen + b)
            if position is not None:  # the prediction made at position - 1 is wrong
                nxt[b, position - 1] = (nxt[b, position - 1] + 1) % self.vocab
        self.seen += input_ids.shape[0]
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 5.0
        return type("Output", (), {"logits": logits})()


def test_exact_match_counts_rows_whose_every_target_is_the_argmax() -> None:
    from mergekit_fisher.data import CalibrationData, Example
    from mergekit_fisher.search.score import score_source

    prompt, target = (False, False, False), (True, True, True)
    rows = [Example((1, 2, 3, 4, 5, 6), prompt + target) for _ in range(4)]
    rows[2] = Example((1, 2, 3, 4, 5), prompt + target[:2])  # padded in its batch
    data = CalibrationData(tuple(rows), "fp", ("s",))
    # row 0 is wrong only on a prompt token (still exact), row 1 on its last target, row 3 on
    # its first target, row 2 nowhere; batches of 3 and 1 (padding never counts)
    model = _Oracle(vocab=8, wrong={0: 2, 1: 5, 3: 3})
    scored = score_source(model, "s", data, pad_id=0, batch_size=3)
    assert (scored.rows, scored.exact, scored.tokens) == (4, 2, 11)
    assert scored.exact_share == 0.5
    # the independent loss: 9 right targets, 2 wrong; log-softmax of one-hot logits
    right = -torch.log_softmax(torch.tensor([5.0] + [0.0] * 7), 0)[0]
    wrong = -torch.log_softmax(torch.tensor([0.0, 5.0] + [0.0] * 6), 0)[0]
    assert scored.nll == pytest.approx(float(9 * right + 2 * wrong), rel=1e-6)
    other = SourceLoss("t", nll=1.0, tokens=1, rows=4, exact=4)
    assert objective([scored, other], "exact") == pytest.approx(1 - (0.5 + 1.0) / 2)


def _greedy(model, ids: list[int], steps: int) -> list[int]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        for _ in range(steps):
            ids = [*ids, int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    return ids[-steps:]


def test_shared_prompt_prefix_is_cached_and_scores_equal_the_plain_forward(
    tmp_path: Path, tiny_llama
) -> None:  # type: ignore[no-untyped-def]
    """Chat rows sharing a system prompt: the cached prefix and target-only output layer give
    each row's plain, unpadded forward's loss and greedy exact match. Half the answers are the
    model's own greedy continuation, so exact match is not trivially zero."""
    from conftest import make_tokenizer
    from transformers import AutoModelForCausalLM

    from mergekit_fisher.data import load_calibration_data
    from mergekit_fisher.search.score import score_source, shared_prefix

    tok = make_tokenizer()  # a template without end-of-turn tokens: targets are the answers
    tok.chat_template = tok.chat_template.replace("{{ eos_token }}", "")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    system = {"role": "system", "content": "answer with the sum, nothing else."}
    rows = []
    for i, question in enumerate(["12+34", "1+1", "7+80", "5+5", "9+0", "3+4", "2+2", "8+1"]):
        chat = [system, {"role": "user", "content": question}]
        prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        (own,) = _greedy(model, tok(prompt, add_special_tokens=False)["input_ids"], 1)
        char = tok.convert_ids_to_tokens(own)
        answer = char if i % 2 == 0 and char not in tok.all_special_tokens else "46"
        rows.append({"messages": [*chat, {"role": "assistant", "content": answer}]})
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_calibration_data([str(path)], tok)
    assert shared_prefix(data.examples) >= len(system["content"])  # the cache path is taken
    nll, exact = 0.0, 0
    with torch.no_grad():
        for ex in data.examples:  # the reference: each row alone, every position's logits
            ids = torch.tensor([ex.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = torch.tensor(ex.target_mask[1:])
            labels = ids[0, 1:]
            logp = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None])[:, 0]
            nll -= float(logp[targets].sum())
            exact += bool((logits.argmax(-1) == labels)[targets].all())
    assert 0 < exact < len(rows)
    scored = score_source(model, "sums", data, tok.pad_token_id, batch_size=4)
    assert scored.tokens == data.num_tokens and scored.rows == len(rows)
    assert scored.nll == pytest.approx(nll, rel=1e-5)
    assert scored.exact == exact


def test_exact_objective_ties_go_to_the_lower_task_loss() -> None:
    from mergekit_fisher.search.candidates import Candidate
    from mergekit_fisher.search.run import Scored, best_of

    def scored(label: str, loss: float, tiebreak: float) -> Scored:
        candidate = Candidate(method="linear", recipe={}, settings=(), label=label)
        return Scored(candidate, (), loss, 0.0, tiebreak)

    picks = [scored("a", 0.25, 0.9), scored("b", 0.25, 0.4), scored("c", float("nan"), 0.1)]
    assert best_of(picks).label() == "b"
    assert best_of([scored("d", 0.5, 0.1), *picks]).label() == "b"


ALL_INPUTS = {
    "base_model": "base",
    "models": [
        {"model": "base", "parameters": {"fisher": "fb"}},  # an anchor store: never used here
        {"model": "e1", "parameters": {"weight": 2.0, "fisher": "f1", "gram": "g1"}},
        {"model": "e2", "parameters": {"fisher": "f2", "gram": "g2"}},
    ],
    "merge_method": "fisher",
    "parameters": {"normalize": False},
    "dtype": "float32",
    "out_dtype": "bfloat16",
}


def test_methods_build_each_methods_own_recipe(caplog: pytest.LogCaptureFixture) -> None:
    found = method_candidates(ALL_INPUTS, parse_methods("all"))
    by_method: dict[str, list] = {}
    for c in found:
        by_method.setdefault(c.method, []).append(c.recipe)
        assert c.recipe["merge_method"] == c.method
        assert [m["model"] for m in c.recipe["models"]] == ["e1", "e2"]  # experts only
        assert c.recipe["dtype"] == "float32" and c.recipe["out_dtype"] == "bfloat16"
    assert {m: len(r) for m, r in by_method.items()} == {
        "linear": 1,
        "karcher": 1,
        "task_arithmetic": 6,
        "ties": 2,
        "dare_ties": 2,
        "della": 2,
        "fisher": 1,
        "fisher_arithmetic": 4,
        "fisher_ties": 3,
        "regmean": 1,
    }
    for method, recipes in by_method.items():
        needs_base = method not in ("linear", "karcher", "fisher", "regmean")
        for recipe in recipes:
            assert ("base_model" in recipe) == needs_base
            params = [m.get("parameters", {}) for m in recipe["models"]]
            stores = {k for p in params for k in p if k in ("fisher", "gram")}
            expected = {
                "fisher": {"fisher"},
                "fisher_arithmetic": {"fisher"},
                "fisher_ties": {"fisher"},
                "regmean": {"gram"},
            }
            assert stores == expected.get(method, set())
    assert by_method["fisher"][0]["models"][0]["parameters"] == {"weight": 1.0, "fisher": "f1"}
    assert [r["parameters"]["gamma"] for r in by_method["fisher_arithmetic"]] == [0, 0.1, 0.3, 1]
    assert [r["models"][1]["parameters"]["weight"] for r in by_method["task_arithmetic"]] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.25,
        1.5,
    ]
    assert {r["models"][0]["parameters"]["density"] for r in by_method["ties"]} == {0.5, 0.7}
    assert {r["models"][1]["parameters"]["density"] for r in by_method["fisher_ties"]} == {1.0, 0.7}
    assert [r.get("parameters", {}).get("normalize") for r in by_method["fisher_ties"]] == [
        None,
        None,
        True,
    ]
    assert "parameters" not in by_method["linear"][0]  # the input's shared values are dropped

    no_gram = {**ALL_INPUTS, "models": [{"model": "e1", "parameters": {"fisher": "f1"}}]}
    no_gram = {k: v for k, v in no_gram.items() if k != "base_model"}
    with caplog.at_level("WARNING", logger="mergekit_fisher"):
        found = method_candidates(no_gram, ["fisher", "regmean", "ties"])
    assert [c.method for c in found] == ["fisher"]
    assert "skipping regmean: model e1 has no `gram:` store" in caplog.text
    assert "skipping ties: it needs base_model" in caplog.text
    with pytest.raises(SearchError, match="no default grid for \\['slerp'\\]"):
        parse_methods("linear,slerp")
    with pytest.raises(SearchError, match="use one of them"):
        search(ALL_INPUTS, ["x.txt"], grid={"weight": [1]}, methods=["linear"])


def test_search_cli_writes_best_recipe(tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    from mergekit_fisher.cli import main

    models = list(tiny_llama_pair)
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    (tmp_path / "r.yml").write_text(yaml.safe_dump(fisher_recipe(models, stores, [1.0, 1.0])))
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    result = CliRunner().invoke(
        main,
        [
            "search",
            str(tmp_path / "r.yml"),
            "--data",
            str(data),
            "--grid",
            "weight=0.5,2",
            "--grid",
            "epsilon=1e-8,1e-3",
            "--objective",
            "exact",
            "--out",
            str(tmp_path / "best.yml"),
            "--report",
            str(tmp_path / "report.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    table = [line for line in result.output.splitlines() if not line.startswith("search:")]
    assert "best:" in result.output and sum("weights=" in line for line in table) == 5
    header = next(line for line in result.output.splitlines() if "objective" in line)
    assert "heldout" in header and "heldout EM" in header
    best = yaml.safe_load((tmp_path / "best.yml").read_text())
    assert best["merge_method"] == "fisher" and best["parameters"]["epsilon"] in (1e-8, 1e-3)
    # A random tiny model reproduces no row: every candidate ties at 1.0 and the lowest loss wins
    rows = json.loads((tmp_path / "report.json").read_text())["candidates"]
    assert all(r["objective"] == 1.0 and set(r["exact_match"].values()) == {0.0} for r in rows)
    assert best == min(rows, key=lambda r: r["losses"][str(data)])["recipe"]


def test_search_cli_methods_writes_the_argmin_and_a_report(
    tmp_path: Path, tiny_llama, tiny_llama_pair
) -> None:  # type: ignore[no-untyped-def]
    from mergekit.config import MergeConfiguration

    from mergekit_fisher.cli import main

    experts = list(tiny_llama_pair)
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(experts)]
    recipe = {
        "merge_method": "fisher",
        "base_model": str(tiny_llama),
        "models": [
            {"model": str(m), "parameters": {"fisher": str(s)}} for m, s in zip(experts, stores)
        ],
        "dtype": "float32",
    }
    (tmp_path / "all.yml").write_text(yaml.safe_dump(recipe))
    sources = [tmp_path / "add.txt", tmp_path / "long.jsonl"]
    sources[0].write_text("\n".join(TEXTS))
    sources[1].write_text("\n".join(json.dumps({"text": t}) for t in LONG))
    args = [
        "search",
        str(tmp_path / "all.yml"),
        "--methods",
        "linear,task_arithmetic,fisher_arithmetic",
    ]
    for source in sources:
        args += ["--data", str(source)]
    args += ["--out", str(tmp_path / "best.yml"), "--report", str(tmp_path / "report.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["candidates"]
    assert [r["method"] for r in rows] == ["linear"] + ["task_arithmetic"] * 6 + [
        "fisher_arithmetic"
    ] * 4
    assert report["objective"] == "tasks" and set(report["sources"]) == {str(s) for s in sources}
    for row in rows:
        assert set(row["losses"]) == {str(s) for s in sources} and row["seconds"] > 0
        assert row["objective"] == pytest.approx(sum(row["losses"].values()) / 2)
    best = min(rows, key=lambda r: r["objective"])
    assert report["best"] == best["label"] and f"best: {best['label']}" in result.output
    written = yaml.safe_load((tmp_path / "best.yml").read_text())
    assert written == best["recipe"] == report["best_recipe"]
    MergeConfiguration.model_validate(written)
    run_recipe(written, tmp_path / "merged")  # a plain recipe that merges as written
    header = next(line for line in result.output.splitlines() if "objective" in line)
    assert "add" in header and "long" in header and "seconds" in header
    gamma0 = next(r for r in rows if r["label"].endswith("gamma=0.0"))
    ta1 = next(r for r in rows if r["label"] == "task_arithmetic weight=1.0")
    assert gamma0["objective"] == pytest.approx(ta1["objective"], rel=1e-5)  # gamma 0 == TA


def _rows(nll: list[float]) -> dict[str, Any]:
    from mergekit_fisher.search.score import RowScores

    n = len(nll)
    tensors = torch.tensor(nll, dtype=torch.float64), torch.ones(n, dtype=torch.long)
    return {"s": RowScores(*tensors, torch.zeros(n, dtype=torch.bool))}


def test_racing_stops_a_candidate_only_when_the_first_rows_show_it_behind() -> None:
    from mergekit_fisher.search.race import MIN_ROWS, chance_ahead, split_rows

    first, rest = split_rows(100)
    assert len(first) == 25 and sorted(first + rest) == list(range(100))
    assert split_rows(100) == (first, rest) and split_rows(5) == (split_rows(5)[0], [])
    assert len(split_rows(20)[0]) == MIN_ROWS
    noise = torch.linspace(-0.5, 0.5, 16)[
        torch.randperm(16, generator=torch.Generator().manual_seed(1))
    ]
    good = _rows((1.0 + noise).tolist())
    assert chance_ahead(_rows((3.0 + noise).tolist()), good, "tasks") == 0.0
    assert chance_ahead(good, _rows((3.0 + noise).tolist()), "tasks") == 1.0
    jitter = torch.linspace(-0.3, 0.3, 16)[
        torch.randperm(16, generator=torch.Generator().manual_seed(2))
    ]
    assert 0.2 < chance_ahead(_rows((1.0 + noise + jitter).tolist()), good, "tasks") < 0.8


class _Answers(torch.nn.Module):
    """Always right (``wrong`` False) or always wrong: a model for racing tests."""

    def __init__(self, wrong: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.wrong = wrong

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # type: ignore[no-untyped-def]
        nxt = (torch.roll(input_ids, -1, dims=1) + int(self.wrong)) % 8
        return type("Output", (), {"logits": torch.nn.functional.one_hot(nxt, 8).float() * 5})()


@pytest.mark.parametrize("prune", [True, False])
def test_race_scores_a_clear_loser_on_the_first_rows_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prune: bool
) -> None:
    from mergekit_fisher.data import CalibrationData, Example
    from mergekit_fisher.search import run
    from mergekit_fisher.search.ahead import Merged
    from mergekit_fisher.search.candidates import Candidate

    rows = tuple(Example((1, 2, 3, 4, 5), (False, False, True, True, True)) for _ in range(40))
    samples = {"s": CalibrationData(rows, "fp", ("s",))}
    monkeypatch.setattr(run, "_load", lambda path, device: _Answers(wrong=path.name == "bad"))
    race = run.Race(
        run.Scoring(samples, pad_id=0, batch_size=8, device="cpu", objective="tasks", prune=prune)
    )
    scored = {
        name: race.score(Candidate("linear", {}, (), name), Merged(tmp_path / name, 1.0))
        for name in ("good", "bad", "good-too")
    }
    assert scored["bad"].pruned is prune and scored["bad"].losses[0].rows == (10 if prune else 40)
    assert not scored["good"].pruned and scored["good"].losses[0].rows == 40
    assert not scored["good-too"].pruned  # a tie is not evidence of being behind
    assert run.best_of(list(scored.values())) is scored["good"]
    first_bad = run.Race(race.scoring).score(
        Candidate("linear", {}, (), "b"), Merged(tmp_path / "bad", 0)
    )
    assert not first_bad.pruned  # nothing to race against yet


def test_merges_ahead_in_a_worker_equal_merges_in_process(tmp_path: Path, tiny_llama_pair) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    from mergekit_fisher.search.ahead import merged_ahead

    models = list(tiny_llama_pair)
    recipes = [
        {
            "merge_method": "linear",
            "models": [
                {"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (1.0, x))
            ],
            "dtype": "float32",
        }
        for x in (0.5, 2.0, 3.0)
    ]
    merged = {}
    for workers in (0, 1):
        scratch = tmp_path / f"w{workers}"
        scratch.mkdir()
        with merged_ahead(recipes, scratch, {}, workers) as merges:
            merged[workers] = [load_file(next(m.path.glob("*.safetensors"))) for m in merges]
    for ours, theirs in zip(merged[0], merged[1], strict=True):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    bad = [{"merge_method": "linear", "models": [{"model": str(tmp_path / "missing")}]}]
    with (
        pytest.raises(SearchError, match=r"merging candidate-0: .*missing"),
        merged_ahead(bad, tmp_path, {}, 1) as merges,
    ):
        list(merges)
