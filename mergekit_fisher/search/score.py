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


@dataclass(frozen=True)
class RowScores:
    """Per row of one source: summed target NLL, target tokens, and whether every target
    token is the argmax; what a search compares candidates on, row by row."""

    nll: torch.Tensor  # float64 [rows]
    tokens: torch.Tensor  # int64 [rows]
    hit: torch.Tensor  # bool [rows]

    def loss(self, source: str) -> SourceLoss:
        """The source's totals (an exact float64 sum, whatever the order rows were scored in)."""
        return SourceLoss(
            source,
            math.fsum(self.nll.tolist()),
            int(self.tokens.sum()),
            len(self.nll),
            int(self.hit.sum()),
        )

    def __add__(self, other: RowScores) -> RowScores:
        return RowScores(*(torch.cat([a, b]) for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.nll, self.tokens, self.hit


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
    return score_rows(model, data.examples, pad_id, batch_size).loss(source)


def score_rows(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 8
) -> RowScores:
    """Each row's target loss and exact match under ``model``.

    Two savings, same numbers (to float rounding): the prompt prefix every row shares (chat
    template, system prompt, a task's instruction) runs once and is reused through the model's
    KV cache, and the output layer runs only where a target token is predicted. Validation rows
    are mostly prompt, so this halves a search's scoring on chat data. Models whose forward
    takes no cache or ``logits_to_keep`` are scored whole.
    """
    device = next(model.parameters()).device
    style = _forward_style(model)
    prefix = shared_prefix(examples) if style.cache else 0
    parts = []
    with torch.no_grad():
        cache = _prefix_cache(model, style, examples[0].input_ids[:prefix], device)
        for start in range(0, len(examples), batch_size):
            batch = pad_batch(examples[start : start + batch_size], pad_id)
            parts.append(_score_batch(model, style, batch, prefix, cache, device))
    return RowScores(*(torch.cat(column) for column in zip(*(p.fields() for p in parts))))


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
) -> RowScores:
    """Per row of one batch whose first ``prefix`` tokens are in ``cache``: summed target NLL,
    target tokens, and whether every target is the argmax."""
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
    nll = -torch.where(targets, picked.double(), 0.0).sum(-1)  # 0 * a NaN pad would leak
    return RowScores(nll.cpu(), targets.sum(-1).cpu(), hit.all(-1).cpu())


def objective(losses: Sequence[SourceLoss], kind: str = "tasks") -> float:
    """``tasks``: mean over sources of each one's mean token loss; ``tokens``: pooled;
    ``exact``: mean over sources of each one's share of rows missed (1 - exact match)."""
    column = lambda field: torch.tensor([getattr(x, field) for x in losses], dtype=torch.float64)  # noqa: E731
    return float(objective_values(*(column(f) for f in ("nll", "tokens", "exact", "rows")), kind))


def objective_values(
    nll: torch.Tensor, tokens: torch.Tensor, exact: torch.Tensor, rows: torch.Tensor, kind: str
) -> torch.Tensor:
    """The objective from per-source totals shaped [sources, ...]: one value per trailing index
    (a search's bootstrap resamples score many row sets at once)."""
    if kind == "tasks":
        return (nll / tokens.clamp_min(1)).mean(0)
    if kind == "tokens":
        return nll.sum(0) / tokens.sum(0).clamp_min(1)
    if kind == "exact":
        return 1.0 - (exact / rows.clamp_min(1)).mean(0)
    raise SearchError(f"objective {kind!r}: choose one of {', '.join(OBJECTIVES)}")
