"""The real benchmark's chat tasks: each generator's answers, determinism, disjoint splits, and
the first four tasks' problems unchanged by the later ones (their cached results stay valid)."""

from __future__ import annotations

import hashlib
import random
import re

import pytest

from mergekit_fisher.real import chat_tasks

NEW = ("count", "add", "upper", "last")
SIZES = {"train": 480, "calib": 64, "valid": 64, "eval": 100}
FIRST_FOUR_DIGEST = "a00a656c93edaadbf0010fd5163c4307707c3d1f9f6147aae806cec7920d0660"
"""sha256 of the first four tasks' seed-0 problems, every split, as the 2- and 4-expert results
were scored on them."""


def _draws(task: str, n: int = 200) -> list[tuple[str, str]]:
    rng = random.Random(0)
    return [chat_tasks.TASKS[task](rng) for _ in range(n)]


def _listed(prompt: str) -> list[str]:
    """The comma-separated items after a prompt's colon."""
    return prompt.split(": ", 1)[1].rstrip("?").split(", ")


def test_count_answers_how_many_items_are_listed() -> None:
    for prompt, answer in _draws("count"):
        items = _listed(prompt)
        assert answer == str(len(items)) and 3 <= len(items) <= 7
        assert len(set(items)) == len(items)


def test_add_answers_the_sum() -> None:
    for prompt, answer in _draws("add"):
        found = re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt)
        assert found is not None
        assert answer == str(int(found[1]) + int(found[2]))


def test_upper_answers_the_words_in_capitals() -> None:
    for prompt, answer in _draws("upper"):
        words = prompt.removeprefix("Write in capital letters: ")
        assert answer == words.upper() and words.islower() and len(words.split()) == 2


def test_last_answers_the_final_item() -> None:
    for prompt, answer in _draws("last"):
        items = _listed(prompt)
        assert answer == items[-1] and 3 <= len(items) <= 6


@pytest.mark.parametrize("task", NEW)
def test_a_new_task_is_deterministic_with_disjoint_splits(task: str) -> None:
    assert _draws(task) == _draws(task)
    drawn = {split: chat_tasks.problems(task, split, n) for split, n in SIZES.items()}
    for split, items in drawn.items():
        assert {chat_tasks.split_of(p.prompt) for p in items} == {split}
        assert len({p.prompt for p in items}) == SIZES[split]
    assert drawn["eval"] == chat_tasks.problems(task, "eval", SIZES["eval"], seed=1)
    assert drawn["train"] != chat_tasks.problems(task, "train", SIZES["train"], seed=1)


def test_no_prompt_belongs_to_two_tasks() -> None:
    prompts = [{p for p, _ in _draws(t)} for t in chat_tasks.TASKS]
    assert len(set().union(*prompts)) == sum(map(len, prompts))


def test_the_first_four_tasks_problems_are_unchanged() -> None:
    digest = hashlib.sha256()
    for task in ("acronym", "max", "pick", "reverse"):
        for split, n in SIZES.items():
            for p in chat_tasks.problems(task, split, n, seed=0):
                digest.update(f"{p.task}\t{p.prompt}\t{p.answer}\n".encode())
    assert digest.hexdigest() == FIRST_FOUR_DIGEST
