"""Held-out loss and exact match of a merged model, per data source, and the objective a
search minimises.

Each ``--data`` source is one task. The default objective (``tasks``) is the mean over sources
of each source's mean target-token loss, so every task counts equally however long its answers
are; ``tokens`` pools every target token (a task with long answers then dominates: it picked a
grid edge that lowered held-out accuracy). ``exact`` is the mean over sources of the share of
rows *not* reproduced exactly (every target token the model's argmax, from the same forward
pass as the loss; for a chat row that is greedy decoding's answer up to its end-of-turn token),
ties broken by ``tasks``: the objective for short answers scored by exact match.
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

OBJECTIVES = ("tasks", "tokens", "exact")


@dataclass(frozen=True)
class SourceLoss:
    """Summed negative log-likelihood of one source's target tokens and how many there were;
    how many rows it has and how many of them the model reproduces exactly."""

    source: str
    nll: float
    tokens: int
    rows: int = 0
    exact: int = 0

    @property
    def mean(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def exact_share(self) -> float:
        """Exact match: the share of rows whose every target token is the model's argmax."""
        return self.exact / max(self.rows, 1)


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


def score_source(
    model: torch.nn.Module,
    source: str,
    data: CalibrationData,
    pad_id: int,
    batch_size: int = 8,
) -> SourceLoss:
    """Loss and exact match of ``model`` on the target tokens of one source."""
    device = next(model.parameters()).device
    total, count, exact = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(data.examples), batch_size):
            batch = pad_batch(data.examples[start : start + batch_size], pad_id)
            logits = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
            ).logits.float()
            targets = batch.target_mask[:, 1:].to(device)
            labels = batch.input_ids[:, 1:].to(device)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            total -= float(picked[targets].double().sum())
            count += int(targets.sum())
            hit = logits[:, :-1].argmax(dim=-1) == labels
            exact += int((hit | ~targets).all(dim=-1).sum())
    return SourceLoss(source, total, count, len(data.examples), exact)


def source_losses(
    model: torch.nn.Module, samples: dict[str, CalibrationData], pad_id: int, batch_size: int
) -> tuple[SourceLoss, ...]:
    """The loss and exact match of ``model`` on every source."""
    return tuple(
        score_source(model, source, data, pad_id, batch_size) for source, data in samples.items()
    )


def objective(losses: Sequence[SourceLoss], kind: str = "tasks") -> float:
    """``tasks``: mean over sources of each one's mean token loss; ``tokens``: pooled;
    ``exact``: mean over sources of each one's share of rows missed (1 - exact match)."""
    if kind == "tasks":
        return math.fsum(loss.mean for loss in losses) / len(losses)
    if kind == "tokens":
        return math.fsum(loss.nll for loss in losses) / max(sum(x.tokens for x in losses), 1)
    if kind == "exact":
        return 1.0 - math.fsum(loss.exact_share for loss in losses) / len(losses)
    raise SearchError(f"objective {kind!r}: choose one of {', '.join(OBJECTIVES)}")
