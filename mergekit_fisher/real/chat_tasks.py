"""Eight short-answer instruction tasks for a real chat LLM, generated in code (no download).

The first four were fixed before any merge was looked at (docs/benchmarks.md#real-model-quality):

* ``acronym``: "Write the acronym of: solar ocean river" -> "SOR".
* ``max``: "Which number is the largest: 42, 17, 88, 5?" -> "88".
* ``pick``: "List: fig, kiwi, lime, plum, pear. Which item is number 3?" -> "lime".
* ``reverse``: "Reverse the order of: fig, kiwi, lime" -> "lime, kiwi, fig" (the long answers).

The other four were added for the 8-expert setting, after the 2- and 4-expert results and
before any 8-expert merge was scored; adding them changed none of the first four's problems:

* ``count``: "How many items are in this list: fig, kiwi, lime?" -> "3".
* ``add``: "What is 23 + 14?" -> "37".
* ``upper``: "Write in capital letters: solar ocean" -> "SOLAR OCEAN".
* ``last``: "What is the last item of: fig, kiwi, lime?" -> "lime".

Each answer is exact and short, so a model is scored by greedy exact match. SmolLM2-135M-Instruct
answers in sentences ("The largest number is 88."), so the base scores near zero and each
expert has to learn its task's content and its terse format. Splits come from a stable hash of
the prompt, never from a seed: ``eval`` problems never appear in any train, calibration or
validation set of any seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mergekit_fisher.store import write_text_atomic

Split = Literal["train", "calib", "valid", "eval"]
SYSTEM = "You are a helpful assistant."

WORDS = [
    "apple",
    "amber",
    "anchor",
    "arrow",
    "autumn",
    "badge",
    "baker",
    "bamboo",
    "banner",
    "basket",
    "beacon",
    "berry",
    "blanket",
    "bottle",
    "breeze",
    "bridge",
    "brush",
    "cabin",
    "camel",
    "candle",
    "canyon",
    "carpet",
    "castle",
    "cedar",
    "chalk",
    "cherry",
    "cloud",
    "clover",
    "cobalt",
    "comet",
    "copper",
    "coral",
    "cotton",
    "crane",
    "crystal",
    "dagger",
    "daisy",
    "desert",
    "dollar",
    "dragon",
    "eagle",
    "echo",
    "ember",
    "falcon",
    "feather",
    "fiber",
    "forest",
    "fossil",
    "garden",
    "garlic",
    "ginger",
    "glacier",
    "granite",
    "harbor",
    "hazel",
    "helmet",
    "honey",
    "island",
    "ivory",
    "jacket",
    "jungle",
    "kettle",
    "ladder",
    "lantern",
    "lemon",
    "magnet",
    "maple",
    "marble",
    "meadow",
    "metal",
    "mirror",
    "monkey",
    "mosaic",
    "needle",
    "nickel",
    "ocean",
    "olive",
    "orbit",
    "otter",
    "paddle",
    "palace",
    "panda",
    "pepper",
    "pillow",
    "planet",
    "pocket",
    "quartz",
    "rabbit",
    "radar",
    "raven",
    "ribbon",
    "river",
    "rocket",
    "saddle",
    "salmon",
    "shadow",
    "silver",
    "socket",
    "spider",
    "spring",
    "stone",
    "sugar",
    "summit",
    "tiger",
    "timber",
    "tulip",
    "tunnel",
    "velvet",
    "violet",
    "wagon",
    "walnut",
    "willow",
    "window",
    "winter",
    "wizard",
    "yellow",
    "zebra",
]


@dataclass(frozen=True)
class Problem:
    """One chat turn: the user's ``prompt`` and the exact ``answer``."""

    task: str
    prompt: str
    answer: str

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.prompt}]
        if with_answer:
            turns.append({"role": "assistant", "content": self.answer})
        return turns


def _acronym(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return f"Write the acronym of: {' '.join(words)}", "".join(w[0].upper() for w in words)


def _max(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(10, 100), rng.randint(4, 6))
    shown = ", ".join(map(str, numbers))
    return f"Which number is the largest: {shown}?", str(max(numbers))


def _pick(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(WORDS, 5)
    k = rng.randint(1, 5)
    return f"List: {', '.join(items)}. Which item is number {k}?", items[k - 1]


def _reverse(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of: {', '.join(items)}", ", ".join(reversed(items))


def _count(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(WORDS, rng.randint(3, 7))
    return f"How many items are in this list: {', '.join(items)}?", str(len(items))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    return f"What is {a} + {b}?", str(a + b)


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 2)
    return f"Write in capital letters: {' '.join(words)}", " ".join(words).upper()


def _last(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(WORDS, rng.randint(3, 6))
    return f"What is the last item of: {', '.join(items)}?", items[-1]


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "acronym": _acronym,
    "max": _max,
    "pick": _pick,
    "reverse": _reverse,
    "count": _count,
    "add": _add,
    "upper": _upper,
    "last": _last,
}


def split_of(prompt: str) -> Split:
    """A stable split per prompt: 10% eval, 10% valid, 10% calib, 70% train."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10
    return {0: "eval", 1: "valid", 2: "calib"}.get(bucket, "train")


def problems(task: str, split: Split, n: int, seed: int = 0) -> list[Problem]:
    """``n`` distinct problems of ``task`` in ``split``; eval problems do not depend on ``seed``."""
    stream = 0 if split == "eval" else seed
    rng = random.Random(f"{task}/{split}/{stream}")
    found: dict[str, Problem] = {}
    for _ in range(200 * n):
        prompt, answer = TASKS[task](rng)
        if prompt not in found and split_of(prompt) == split:
            found[prompt] = Problem(task, prompt, answer)
            if len(found) == n:
                return list(found.values())
    raise ValueError(f"task {task}: could not draw {n} distinct {split} problems")


def write_jsonl(items: Sequence[Problem], path: Path) -> Path:
    """Chat records (``{"messages": [...]}``) that ``estimate``/``search`` read directly,
    written atomically: callers cache these files by their existence."""
    lines = (json.dumps({"messages": p.messages()}) for p in items)
    return write_text_atomic(path, "\n".join(lines) + "\n")
