"""Held-out loss of a merged model, per data source, and the objective a search minimises.

Each ``--data`` source is one task. The default objective (``tasks``) is the mean over sources
of each source's mean target-token loss, so every task counts equally however long its answers
are; ``tokens`` pools every target token (a task with long answers then dominates: it picked a
grid edge that lowered held-out accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergekit_fisher.data import CalibrationData, load_calibration_data, pad_batch
from mergekit_fisher.search.candidates import SearchError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OBJECTIVES = ("tasks", "tokens")


@dataclass(frozen=True)
class SourceLoss:
    """Summed negative log-likelihood of one source's target tokens, and how many there were."""

    source: str
    nll: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.nll / max(self.tokens, 1)


def load_samples(
    sources: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_samples: int,
    max_length: int,
    text_field: str,
) -> dict[str, CalibrationData]:
    """Each source tokenized on its own (``num_samples`` sequences each), once per search."""
    repeated = sorted({s for s in sources if list(sources).count(s) > 1})
    if repeated:
        raise SearchError(f"--data {repeated[0]} is given twice: list each source once")
    return {
        source: load_calibration_data(
            [source],
            tokenizer,
            max_length=max_length,
            num_samples=num_samples,
            text_field=text_field,
        )
        for source in sources
    }


def target_nll(
    model: torch.nn.Module, data: CalibrationData, pad_id: int, batch_size: int = 8
) -> tuple[float, int]:
    """(summed NLL, count) of the target tokens of ``data`` under ``model``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.examples), batch_size):
            batch = pad_batch(data.examples[start : start + batch_size], pad_id)
            logits = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
            ).logits.float()
            targets = batch.target_mask[:, 1:].to(device)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, batch.input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            total -= float(picked[targets].double().sum())
            count += int(targets.sum())
    return total, count


def source_losses(
    model: torch.nn.Module, samples: dict[str, CalibrationData], pad_id: int, batch_size: int
) -> tuple[SourceLoss, ...]:
    """The loss of ``model`` on every source."""
    return tuple(
        SourceLoss(source, *target_nll(model, data, pad_id, batch_size))
        for source, data in samples.items()
    )


def objective(losses: Sequence[SourceLoss], kind: str = "tasks") -> float:
    """``tasks``: mean over sources of each one's mean token loss; ``tokens``: pooled."""
    if kind == "tasks":
        return math.fsum(loss.mean for loss in losses) / len(losses)
    if kind == "tokens":
        return math.fsum(loss.nll for loss in losses) / max(sum(x.tokens for x in losses), 1)
    raise SearchError(f"objective {kind!r}: choose one of {', '.join(OBJECTIVES)}")
