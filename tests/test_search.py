"""Coefficient search: every candidate's loss is that of the merged model, scored independently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import fisher_recipe, make_store, run_recipe

from mergekit_fisher.search import (
    SearchError,
    apply,
    candidates_for,
    edge_warnings,
    parse_grid,
    search,
)
from mergekit_fisher.store import clear_cache


@pytest.fixture(autouse=True)
def _fresh_cache():  # type: ignore[no-untyped-def]
    clear_cache()
    yield
    clear_cache()


def naive_loss(model_dir: Path, texts: list[str]) -> float:
    """Per-example, unpadded next-token loss over all tokens after the first."""
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
    applied = apply(recipe, found[-1])
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


def test_search_scores_each_candidate_by_its_merged_models_loss(
    tmp_path: Path, tiny_llama_pair
) -> None:  # type: ignore[no-untyped-def]
    models = list(tiny_llama_pair)
    stores = [make_store(m, tmp_path / f"f{i}", seed=i) for i, m in enumerate(models)]
    data = tmp_path / "heldout.txt"
    data.write_text("\n".join(TEXTS))
    recipe = fisher_recipe(models, stores, [1.0, 1.0])
    result = search(recipe, [str(data)], grid={"weight": [0.25, 4.0]}, batch_size=4)
    assert len(result.candidates) == 2
    assert result.best.loss == min(c.loss for c in result.candidates)
    losses = {c.weights: c.loss for c in result.candidates}
    assert losses[(1.0, 0.25)] != pytest.approx(losses[(1.0, 4.0)])
    for candidate in result.candidates:
        out = tmp_path / f"check-{candidate.weights[1]}"
        run_recipe(apply(recipe, candidate), out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((models[0] / name).read_bytes())
        assert candidate.loss == pytest.approx(naive_loss(out, TEXTS), rel=1e-4)


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
            "--out",
            str(tmp_path / "best.yml"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "best:" in result.output and result.output.count("weights=") == 5
    best = yaml.safe_load((tmp_path / "best.yml").read_text())
    assert best["merge_method"] == "fisher" and best["parameters"]["epsilon"] in (1e-8, 1e-3)
