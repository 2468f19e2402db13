"""Fine-tune a real chat LLM on chat tasks and score it: greedy exact match and answer loss.

Training and scoring tokenize through the product's own data path (``load_calibration_data``
on chat records: the real chat template, assistant-only targets), so what an expert learns,
what ``estimate`` measures and what we score are the same tokens.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergekit_fisher.data import Batch, Example, load_calibration_data, pad_batch
from mergekit_fisher.demo.evaluate import TaskScore
from mergekit_fisher.demo.train import TrainSettings, optimizer_step
from mergekit_fisher.real.chat_tasks import Problem, write_jsonl

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatScore(TaskScore):
    """A ``TaskScore`` with each item's exact-match hit, in item order: paired comparisons
    (a bootstrap over problems) need to know which problems each model got right."""

    hits: tuple[bool, ...] = ()


GENTLE = TrainSettings(steps=30, lr=5e-5, batch_size=16, warmup=4)
"""A gentle full fine-tune, as community experts are made."""


def tokenize(tokenizer, items: Sequence[Problem], scratch: Path) -> list[Example]:  # type: ignore[no-untyped-def]
    """Chat examples with assistant-only targets, through the product's data loader."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:  # processes may share ``scratch``
        path = write_jsonl(items, Path(tmp) / "problems.jsonl")
        return list(load_calibration_data([str(path)], tokenizer, max_length=256).examples)


def _pad_id(tokenizer) -> int:  # type: ignore[no-untyped-def]
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _target_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at every target position, the target tokens), in row order. The output head
    runs on target positions only: a fifth of a 135M model's work is its 49K-row head."""
    device = next(model.parameters()).device
    hidden = model.base_model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    ).last_hidden_state[:, :-1]
    targets = batch.target_mask[:, 1:].to(device)
    logits = model.get_output_embeddings()(hidden[targets]).float()
    return logits, batch.input_ids[:, 1:].to(device)[targets]


def answer_loss(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int
) -> tuple[torch.Tensor, int]:
    """(summed NLL over target tokens, target count) of one padded batch."""
    logits, labels = _target_logits(model, pad_batch(examples, pad_id))
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum"), int(labels.numel())


def finetune(
    model: torch.nn.Module,
    examples: Sequence[Example],
    settings: TrainSettings,
    seed: int,
    pad_id: int,
    label: str = "expert",
) -> list[float]:
    """AdamW with warm-up and cosine decay on shuffled ``examples``; the loss curve."""
    torch.manual_seed(seed)
    order = list(range(len(examples)))
    random.Random(f"finetune/{label}/{seed}").shuffle(order)
    need = settings.steps * settings.batch_size
    order = (order * math.ceil(need / max(len(order), 1)))[:need]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    for step in tqdm(range(settings.steps), desc=f"finetune {label}", leave=False):
        chunk = order[step * settings.batch_size : (step + 1) * settings.batch_size]
        nll, count = answer_loss(model, [examples[i] for i in chunk], pad_id)
        losses.append(optimizer_step(model, nll / max(count, 1), optimizer, scheduler))
    model.eval()
    LOG.info(
        "fine-tuned %s: %d steps, loss %.3f -> %.3f", label, settings.steps, losses[0], losses[-1]
    )
    return losses


def _exact(hits: torch.Tensor, labels: torch.Tensor, batch: Batch, eos_id: int) -> list[bool]:
    """Per row: every target token up to and including the first ``eos_id`` is the argmax."""
    counts = batch.target_mask[:, 1:].sum(dim=1).tolist()
    result, start = [], 0
    for n in counts:
        row_hits, row_labels = hits[start : start + n], labels[start : start + n]
        ends = (row_labels == eos_id).nonzero()
        stop = int(ends[0]) + 1 if len(ends) else n
        result.append(bool(row_hits[:stop].all()))
        start += n
    return result


@torch.no_grad()
def score(model: torch.nn.Module, tokenizer, items: Sequence[Problem], scratch: Path) -> ChatScore:  # type: ignore[no-untyped-def]
    """Greedy exact match and mean answer-token loss on ``items``, from one teacher-forced pass.

    Greedy decoding writes the answer and then the end-of-turn token exactly when each of those
    tokens is the argmax given the ones before it, so exact match needs no generation loop
    (``tests/test_real_model.py`` checks it against ``generate``)."""
    model.eval()
    examples = tokenize(tokenizer, items, scratch)
    hits: list[bool] = []
    total, count = 0.0, 0
    for start in range(0, len(examples), 32):
        batch = pad_batch(examples[start : start + 32], _pad_id(tokenizer))
        logits, labels = _target_logits(model, batch)
        hits += _exact(logits.argmax(-1) == labels, labels, batch, tokenizer.eos_token_id)
        total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        count += int(labels.numel())
    accuracy = sum(hits) / len(items)
    return ChatScore(accuracy, loss=total / max(count, 1), n=len(items), hits=tuple(hits))
