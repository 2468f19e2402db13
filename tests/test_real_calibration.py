"""The real benchmark's shared and generic calibration sets (issue 23, part 3), built without
fine-tuning: task draws, the shipped prompts, a stubbed answerer, the tiny model's replies."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from mergekit_fisher.real import calibration, chat_tasks


@pytest.mark.parametrize("tasks", [("acronym", "max"), tuple(chat_tasks.TASKS)])
def test_shared_set_takes_equal_shares_of_the_tasks_own_calib_sets(tasks: tuple[str]) -> None:
    items = calibration.shared(tasks, 64, seed=3)
    assert len(items) == 64 and len({p.prompt for p in items}) == 64
    assert Counter(p.task for p in items) == dict.fromkeys(tasks, 64 // len(tasks))
    own = {p for t in tasks for p in chat_tasks.problems(t, "calib", 64, seed=3)}
    assert set(items) <= own
    assert items == calibration.shared(tasks, 64, seed=3)
    assert items != calibration.shared(tasks, 64, seed=4)


def test_an_uneven_shared_set_gives_the_rest_to_the_first_tasks() -> None:
    items = calibration.shared(tuple(chat_tasks.TASKS), 10, seed=0)
    assert [Counter(p.task for p in items)[t] for t in chat_tasks.TASKS] == [2, 2] + [1] * 6


def _stub(items: Sequence[chat_tasks.Problem]) -> list[str]:
    return [f"reply {i}." for i in range(len(items))]


def test_generic_set_is_chat_with_none_of_the_tasks(tmp_path: Path) -> None:
    prompts = calibration.generic_prompts()  # read as the installed package holds it
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    stems = {task(random.Random(0))[0].split(":")[0] for task in chat_tasks.TASKS.values()}
    assert not any(p.split(":")[0] in stems for p in prompts)

    items = calibration.generic(_stub, 64, seed=0)
    assert len(items) == 64 and {p.task for p in items} == {calibration.GENERIC_TASK}
    assert [p.answer for p in items] == _stub(items)
    assert items == calibration.generic(_stub, 64, seed=0)
    assert items != calibration.generic(_stub, 64, seed=1)
    path = chat_tasks.write_jsonl(items, tmp_path / "generic.jsonl")
    record = json.loads(path.read_text().splitlines()[0])
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]


def test_greedy_replies_are_deterministic_and_bounded(tiny_llama: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    items = [chat_tasks.Problem("chat", prompt, "") for prompt in ("hi there?", "name a fruit.")]
    replies = calibration.greedy_answers(model, tokenizer, items, max_new_tokens=12)
    assert replies == calibration.greedy_answers(model, tokenizer, items, max_new_tokens=12)
    assert all(len(tokenizer(r, add_special_tokens=False).input_ids) <= 12 for r in replies)


def test_a_cut_reply_ends_at_its_last_full_sentence() -> None:
    cut = calibration.whole_sentences
    assert cut("It rains. Then the sun comes o") == "It rains."
    assert cut("Why? Because it is. And") == "Why? Because it is."
    assert cut("no sentence end at all") == "no sentence end at all"
