"""Evaluate a model on held-out problems: exact-match accuracy (greedy) and completion loss.

Greedy decoding is done here, batched by prompt length so no padding (and no attention-mask or
position-id subtleties) is involved: a batch of equal-length prompts is extended one argmax
token at a time until every row has produced the terminator or the answer budget is spent.
An answer is correct when its tokens up to and including the first terminator equal the
reference completion's tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_fisher.demo.tasks import TERMINATOR, VOCAB, Problem, encode
from mergekit_fisher.demo.train import batch_tensors

__all__ = ["TaskScore", "completion_nll", "evaluate", "greedy_answers"]

_TERMINATOR_ID = VOCAB[TERMINATOR]


@dataclass(frozen=True)
class TaskScore:
    """A model's score on one task's held-out set."""

    accuracy: float
    loss: float
    n: int


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt, cut after the first terminator."""
    model.eval()
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    answers: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            seq = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=device)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            generated = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=seq).logits[:, -1]
                token = logits.argmax(dim=-1)
                generated.append(token)
                done |= token == _TERMINATOR_ID
                seq = torch.cat([seq, token[:, None]], dim=1)
                if bool(done.all()):
                    break
            out = torch.stack(generated, dim=1).tolist()
            for row, tokens in zip(rows, out):
                if _TERMINATOR_ID in tokens:
                    tokens = tokens[: tokens.index(_TERMINATOR_ID) + 1]
                answers[row] = tokens
    return answers


@torch.no_grad()
def completion_nll(
    model: torch.nn.Module,
    problems: Sequence[Problem],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Mean negative log-likelihood per completion token (token-weighted over the set)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(problems), batch_size):
        ids, labels = batch_tensors(problems[start : start + batch_size], device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(nll)
        count += int((target != -100).sum())
    return total / max(count, 1)


def evaluate(
    model: torch.nn.Module,
    problems: Sequence[Problem],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> TaskScore:
    """Exact-match accuracy and mean completion loss of ``model`` on ``problems``."""
    max_new = max(len(p.completion) for p in problems) + 1
    answers = greedy_answers(model, [p.prompt for p in problems], max_new, batch_size, device)
    correct = sum(a == encode(p.completion, bos=False) for a, p in zip(answers, problems))
    return TaskScore(
        accuracy=correct / len(problems),
        loss=completion_nll(model, problems, batch_size, device),
        n=len(problems),
    )
