"""The demo's two synthetic tasks and its character-level tokenizer, generated in code.

Fixed before any merge result was looked at (see docs/demo.md):

* Task ``add`` (digits): ``"37+85="`` -> ``"122."``: the sum of two integers in [0, 99].
* Task ``rev`` (letters): ``"badge>"`` -> ``"egdab."``: a string of 3 to 8 letters from
  ``a``-``j``, reversed.

Each completion ends with ``"."`` so that greedy decoding knows where an answer stops. The two
tasks share no content token (digits vs letters), only the terminator, which makes the merge
question sharp: each expert's knowledge lives in different rows and directions.

Splits are decided by a stable hash of the prompt, never by the seed, so the held-out
evaluation problems are disjoint from every training, validation and calibration problem for
every seed: bucket ``hash % 10`` in {0, 1} is ``eval``, 2 is ``valid`` (only for sanity checks
of training, never for choosing settings from merge results), the rest is ``train`` (training
and Fisher calibration data).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPLITS",
    "TASKS",
    "Problem",
    "Task",
    "encode",
    "make_tokenizer",
    "sample_problems",
    "split_of",
    "write_jsonl",
]

Split = Literal["train", "valid", "eval"]
SPLITS: tuple[Split, ...] = ("train", "valid", "eval")

TERMINATOR = "."
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "0123456789abcdefghij+=>."
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIALS, *CHARS))}


@dataclass(frozen=True)
class Problem:
    """One example: the model reads ``prompt`` and must produce ``completion`` exactly."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Task:
    """A named generator of problems; ``draw`` must be a pure function of the RNG state."""

    name: str
    description: str

    def draw(self, rng: random.Random) -> Problem:
        """One random problem (any split; ``sample_problems`` filters by split)."""
        if self.name == "add":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            return Problem(f"{a}+{b}=", f"{a + b}{TERMINATOR}")
        if self.name == "rev":
            letters = CHARS[10:20]
            word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
            return Problem(f"{word}>", f"{word[::-1]}{TERMINATOR}")
        raise ValueError(f"unknown task {self.name!r}")


TASKS: tuple[Task, Task] = (
    Task("add", "sum of two integers in [0, 99], digits: '37+85=' -> '122.'"),
    Task("rev", "reverse 3-8 letters from a-j: 'badge>' -> 'egdab.'"),
)


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, from a stable hash (independent of any seed)."""
    bucket = int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 10
    return "eval" if bucket < 2 else "valid" if bucket == 2 else "train"


def sample_problems(task: Task, split: Split, n: int, seed: int, stream: str = "") -> list[Problem]:
    """``n`` problems of ``split`` drawn with an RNG keyed by (task, split, seed, stream).

    Different streams of the same seed are independent draws (training batches vs calibration
    data), and evaluation draws never share an RNG with anything used for training.
    """
    rng = random.Random(f"{task.name}/{split}/{seed}/{stream}")
    out: list[Problem] = []
    while len(out) < n:
        problem = task.draw(rng)
        if split_of(problem.prompt) == split:
            out.append(problem)
    return out


def encode(text: str, bos: bool = True) -> list[int]:
    """Token ids of ``text``: identical to the tokenizer's, without its per-call overhead."""
    return ([BOS_ID] if bos else []) + [VOCAB[c] for c in text]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over the demo's alphabet, built offline.

    It prepends ``<s>`` (as Llama's does) and adds nothing behind, so ``prompt + completion``
    tokenizes to BOS followed by one token per character: what ``encode`` produces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def write_jsonl(problems: Sequence[Problem], path: Path) -> Path:
    """Write problems as prompt/completion JSON lines (the calibration-data format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "completion": p.completion}) + "\n")
    return path
