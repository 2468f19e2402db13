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

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mergekit_fisher.data import Batch, CalibrationData, Example, load_calibration_data, pad_batch
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
    """Loss and exact match of ``model`` on the target tokens of one source.

    Two savings, same numbers (to float rounding): the prompt prefix every row shares (chat
    template, system prompt, a task's instruction) runs once and is reused through the model's
    KV cache, and the output layer runs only where a target token is predicted. Validation rows
    are mostly prompt, so this halves a search's scoring on chat data. Models whose forward
    takes no cache or ``logits_to_keep`` are scored whole.
    """
    device = next(model.parameters()).device
    style = _forward_style(model)
    prefix = shared_prefix(data.examples) if style.cache else 0
    total, count, exact = 0.0, 0, 0
    with torch.no_grad():
        cache = _prefix_cache(model, style, data.examples[0].input_ids[:prefix], device)
        for start in range(0, len(data.examples), batch_size):
            batch = pad_batch(data.examples[start : start + batch_size], pad_id)
            nll, tokens, hits = _score_batch(model, style, batch, prefix, cache, device)
            total, count, exact = total + nll, count + tokens, exact + hits
    return SourceLoss(source, total, count, len(data.examples), exact)


@dataclass(frozen=True)
class _ForwardStyle:
    """What a model's forward accepts: the name of its cache argument (None: no cache) and
    whether it takes ``logits_to_keep``."""

    cache: str | None
    logits_to_keep: bool


def _forward_style(model: torch.nn.Module) -> _ForwardStyle:
    """transformers 5.25 renamed ``past_key_values`` to ``cache``; remote code may have neither."""
    parameters = inspect.signature(model.forward).parameters
    cache = next((n for n in ("cache", "past_key_values") if n in parameters), None)
    return _ForwardStyle(cache, "logits_to_keep" in parameters)


def shared_prefix(examples: Sequence[Example]) -> int:
    """Tokens every example starts with, short of each one's first predicting position (so
    every prediction is made after the prefix) and of its last token."""
    limit = min(min(ex.target_mask.index(True) - 1, len(ex.input_ids) - 1) for ex in examples)
    first = examples[0].input_ids
    length = 0
    while length < limit and all(ex.input_ids[length] == first[length] for ex in examples):
        length += 1
    return length


def _prefix_cache(
    model: torch.nn.Module, style: _ForwardStyle, ids: Sequence[int], device: torch.device
) -> Any:
    """The model's KV cache after ``ids`` (None for no ids)."""
    if not ids:
        return None
    out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True)
    return out[style.cache]  # the output names the cache as the forward does


def _score_batch(
    model: torch.nn.Module,
    style: _ForwardStyle,
    batch: Batch,
    prefix: int,
    cache: Any,
    device: torch.device,
) -> tuple[float, int, int]:
    """(summed NLL, target tokens, rows all of whose targets are the argmax) of one batch,
    whose first ``prefix`` tokens are in ``cache``."""
    ids = batch.input_ids[:, prefix:].to(device)
    predicting = batch.target_mask[:, prefix + 1 :].to(device)  # [B, S - 1]: predicts t + 1
    kwargs: dict[str, Any] = {}
    keep = torch.arange(predicting.shape[1], device=device)
    if style.logits_to_keep:
        keep = predicting.any(dim=0).nonzero().squeeze(-1)
        kwargs["logits_to_keep"] = keep
    if cache is not None:
        kwargs[style.cache] = copy.deepcopy(cache)
        kwargs[style.cache].batch_repeat_interleave(ids.shape[0])
        kwargs["use_cache"] = True
    out = model(input_ids=ids, attention_mask=batch.attention_mask.to(device), **kwargs)
    logits = out.logits.float()
    if not style.logits_to_keep:
        logits = logits[:, :-1]
    labels, targets = ids[:, 1:][:, keep], predicting[:, keep]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    hit = (logits.argmax(dim=-1) == labels) | ~targets
    return -float(picked[targets].double().sum()), int(targets.sum()), int(hit.all(-1).sum())


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
