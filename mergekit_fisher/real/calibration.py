"""Calibration sets a community merger actually has (issue 23, part 3).

Mergers rarely hold each expert's training data, so besides ``own`` (each expert's stores on
its own task's calib split) the real benchmark measures every expert of a merge on one set:

* ``shared``: drawn equally from the calib splits of all the merged tasks;
* ``generic``: general chat holding none of the tasks: everyday user prompts shipped with the
  project (``generic_prompts.jsonl``, written by hand), answered by the base model itself
  (``greedy_answers``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections.abc import Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Literal

import torch

from mergekit_fisher.real import chat_tasks

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Kind = Literal["own", "shared", "generic"]
KINDS: tuple[Kind, ...] = ("own", "shared", "generic")
PROMPTS = "generic_prompts.jsonl"
GENERIC_TASK = "generic"


def shared(tasks: Sequence[str], n: int, seed: int) -> list[chat_tasks.Problem]:
    """``n`` calib problems, an equal share from each task (the first tasks take the rest of an
    uneven split), interleaved. A share is the start of the task's own calib draw, so it holds
    only problems that the task's ``own`` set of the same seed holds."""
    counts = [n // len(tasks) + (i < n % len(tasks)) for i in range(len(tasks))]
    draws = [chat_tasks.problems(t, "calib", c, seed=seed) for t, c in zip(tasks, counts)]
    return [p for turn in itertools.zip_longest(*draws) for p in turn if p is not None]


def generic_prompts() -> list[str]:
    """Every shipped everyday prompt, in file order."""
    text = resources.files(__package__).joinpath(PROMPTS).read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def generic(
    answer: Callable[[Sequence[chat_tasks.Problem]], list[str]], n: int, seed: int
) -> list[chat_tasks.Problem]:
    """``n`` shipped prompts (a fixed draw per seed), each answered by ``answer`` (the base
    model's greedy replies in the benchmark; a stub in tests)."""
    chosen = random.Random(f"{GENERIC_TASK}/{seed}").sample(generic_prompts(), n)
    questions = [chat_tasks.Problem(GENERIC_TASK, prompt, "") for prompt in chosen]
    replies = answer(questions)
    return [dataclasses.replace(q, answer=a) for q, a in zip(questions, replies, strict=True)]


def greedy_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[chat_tasks.Problem],
    max_new_tokens: int = 48,
) -> list[str]:
    """Each item's reply as ``model`` writes it greedily, one prompt at a time (no padding, so
    a reply does not depend on its neighbours); a reply that hits ``max_new_tokens`` is cut
    back to its last full sentence."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    replies = []
    for item in items:
        prompt = tokenizer.apply_chat_template(
            item.messages(with_answer=False),
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        ).to(device)
        with torch.no_grad():
            out = model.generate(
                **prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
            )
        new = out[0, prompt["input_ids"].shape[1] :]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        replies.append(text if int(new[-1]) == tokenizer.eos_token_id else whole_sentences(text))
    return replies


def whole_sentences(text: str) -> str:
    """A reply cut off by the token limit, back to its last full sentence when it has one:
    calibration chat should end where a reply naturally ends."""
    end = max(text.rfind(mark) for mark in ".!?")
    return text[: end + 1] if end > 0 else text
