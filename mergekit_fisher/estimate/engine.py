"""The accumulation loop: batches in, per-example squared gradients into a collector.

Definition (docs/fisher.md). For sequence n with target positions T_n,
g_n = grad sum_{t in T_n} log p(y_t | x_<t), with y_t the data token (``empirical``) or a draw
from the model's own p(. | x_<t) (``sampled``). F = (1/N) sum_n (1/K) sum_k g_{n,k}^2.

Draws do not depend on batch composition, device or rank: example n's k-th draw at its target
positions uses a CPU ``torch.Generator`` seeded by :func:`example_seed` (seed, n, k) and
inverse-CDF sampling (:func:`sample_targets`). One forward serves all K draws (K backward
passes through the retained graph).

Vocabulary-wide work stays in the model's dtype except one float32 chunk of rows at a time
(``logits_rows``, set by the vocabulary and ``chunk_bytes``): the logits and their gradient
are the only [B, T, V] tensors a batch keeps (bf16 at 8B, 8 x 512 tokens: 1 GB each).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from mergekit_fisher.data import Example, pad_batch
from mergekit_fisher.estimate.config import EstimateError
from mergekit_fisher.estimate.taps import BatchState

LOG = logging.getLogger(__name__)

_SAMPLE_ROWS = 256  # softmax/cumsum rows at a time when drawing labels


class Collector(Protocol):
    granularity: str
    accumulators: dict[str, torch.Tensor]
    bank: Any  # offload.Accumulators

    def install(self) -> None: ...
    def remove(self) -> None: ...


def example_seed(seed: int, index: int, draw: int) -> int:
    """The generator seed for example ``index``'s ``draw``-th label draw (63 bits)."""
    digest = hashlib.sha256(f"mergekit-fisher:{seed}:{index}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_targets(logits: torch.Tensor, seed: int, index: int, draw: int) -> torch.Tensor:
    """Draw one label per row of ``logits`` [n, V] from softmax(logits), by inverse CDF.

    u_i ~ U[0, 1) from a CPU generator seeded by (seed, index, draw); label i = the first token
    whose cumulative probability exceeds u_i * (total mass). Same rule everywhere: the tests'
    naive reference uses it too.
    """
    n, vocab = logits.shape
    gen = torch.Generator(device="cpu").manual_seed(example_seed(seed, index, draw))
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for s in range(0, n, _SAMPLE_ROWS):
        cdf = torch.softmax(logits[s : s + _SAMPLE_ROWS].to(work), -1).cumsum_(-1)
        target = u[s : s + _SAMPLE_ROWS].to(device=cdf.device, dtype=work).unsqueeze(1)
        picked = torch.searchsorted(cdf, target * cdf[:, -1:], right=True).squeeze(1)
        out[s : s + _SAMPLE_ROWS] = picked.clamp_(max=vocab - 1)
    return out


def logits_rows(vocab: int, chunk_bytes: int) -> int:
    """Positions per float32 chunk of vocabulary-wide work (log-sum-exp, the logits' gradient):
    set by the vocabulary and ``chunk_bytes`` only, never by a memory budget, so that a budget
    cannot change a result."""
    return max(1, chunk_bytes // (4 * max(vocab, 1)))


def _chunks(logits: torch.Tensor, rows: int) -> Iterator[tuple[int, slice]]:
    """(example, positions) of the predicting positions of ``logits`` [B, T, V], ``rows`` at
    a time."""
    b, t = logits.shape[0], logits.shape[1] - 1
    for i in range(b):
        for start in range(0, t, rows):
            yield i, slice(start, min(start + rows, t))


def chunked_logsumexp(logits: torch.Tensor, rows: int, work: torch.dtype) -> torch.Tensor:
    """logsumexp over the vocabulary at every predicting position ([B, T - 1], in ``work``),
    one float32 (``work``) chunk of ``rows`` positions at a time."""
    out = torch.empty(logits.shape[0], logits.shape[1] - 1, dtype=work, device=logits.device)
    for i, pos in _chunks(logits, rows):
        out[i, pos] = torch.logsumexp(logits[i, pos].to(work), -1)
    return out


class TargetLogLik(torch.autograd.Function):
    """Per example, sum over target positions t of log softmax(logits[t])[labels[t]], where
    ``logits`` [B, T, V] (the model's dtype) holds every position and ``lse`` (``work``
    dtype), ``labels``, ``targets`` [B, T - 1] the predicting ones (``lse`` from
    :func:`chunked_logsumexp`, computed once by the caller).

    The backward writes d/dlogits = w (onehot(labels) - exp(logits - lse)), with w the
    incoming gradient at target positions and 0 elsewhere (and at the last position), in
    ``work`` precision, ``rows`` positions at a time, into one tensor of the logits' dtype: the
    same values, in the same order of operations, as autograd's upcast, gather, logsumexp and
    slice backwards, without their vocabulary-sized float32 copies and zero fills.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        lse: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor,
        rows: int,
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, lse, labels, targets)
        ctx.rows = rows
        picked = logits[:, :-1].gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(lse.dtype) - lse
        return torch.where(targets, picked, 0).sum(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        logits, lse, labels, targets = ctx.saved_tensors
        w = torch.where(targets, grad.unsqueeze(1), 0).unsqueeze(-1)
        out = torch.empty_like(logits)
        for i, pos in _chunks(logits, ctx.rows):
            body = torch.sub(logits[i, pos].to(lse.dtype), lse[i, pos].unsqueeze(-1))
            body.exp_().mul_(-w[i, pos])
            body.scatter_add_(-1, labels[i, pos].unsqueeze(-1), w[i, pos])
            out[i, pos] = body
        out[:, -1].zero_()
        return out, None, None, None, None


@dataclass
class Batch:
    """Right-padded examples: positions match the unbatched sequence exactly."""

    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    lengths: list[int]

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


def collate(examples: Sequence[Example], indices: Sequence[int], device: torch.device) -> Batch:
    """``data.pad_batch`` on ``device``, with the example indices and lengths the engine needs."""
    padded = pad_batch(examples, pad_id=0)  # padding is masked: its id never matters
    return Batch(
        indices=list(indices),
        input_ids=padded.input_ids.to(device),
        attention_mask=padded.attention_mask.to(device),
        target_mask=padded.target_mask.to(device),
        lengths=[len(ex.input_ids) for ex in examples],
    )


@dataclass
class BatchOutcome:
    counted: int = 0
    tokens: int = 0
    skipped: list[int] = field(default_factory=list)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's device (right under ``device_map``)."""
    try:
        return model.get_input_embeddings().weight.device  # type: ignore[operator,union-attr]
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def run_batch(
    model: nn.Module,
    batch: Batch,
    state: BatchState,
    *,
    mode: str,
    samples_per_example: int,
    seed: int,
    skip_nonfinite: bool,
    describe: Any = None,
    chunk_bytes: int = 256 * 1024**2,
) -> BatchOutcome:
    """Forward once, backward K times; the installed collector accumulates per-example squares."""
    state.begin(batch.lengths, skip_nonfinite, batch.input_ids.device)
    try:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        work = torch.float64 if out.logits.dtype == torch.float64 else torch.float32
        rows = logits_rows(out.logits.shape[-1], chunk_bytes)
        logits = out.logits.detach()[:, :-1]
        targets = batch.target_mask[:, 1:].to(logits.device)
        lse = chunked_logsumexp(out.logits.detach(), rows, work)
        finite = torch.isfinite(torch.where(targets, lse, 0).sum(1))
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        if bad and not skip_nonfinite:
            raise _nonfinite(batch.indices[bad[0]], "log-likelihood", describe)
        if bad:
            state.bad[torch.tensor(bad, device=state.bad.device)] = True  # type: ignore[index]
            targets = targets & finite.unsqueeze(1)
        keep = finite.to(logits.device)
        draws = samples_per_example if mode == "sampled" else 1
        for k in range(draws):
            labels = _labels(batch, logits, targets, mode, seed, k)
            loglik = TargetLogLik.apply(out.logits, lse, labels, targets, rows)
            torch.where(keep, loglik, 0).sum().backward(retain_graph=k < draws - 1)
        late = [i for i in state.nonfinite() if i not in bad]
        if late and not skip_nonfinite:
            raise _nonfinite(batch.indices[late[0]], "gradient", describe)
        if late:
            LOG.warning(
                "example(s) %s: gradient became non-finite during backward; skipped from there on "
                "(layers nearer the output keep their finite part)",
                [batch.indices[i] for i in late],
            )
        skipped = sorted(set(bad) | set(late))
        counted = [i for i in range(len(batch.indices)) if i not in skipped]
        tokens = int(batch.target_mask[counted].sum()) if counted else 0
        return BatchOutcome(len(counted), tokens, [batch.indices[i] for i in skipped])
    finally:
        state.end()


def _labels(
    batch: Batch, logits: torch.Tensor, targets: torch.Tensor, mode: str, seed: int, draw: int
) -> torch.Tensor:
    if mode == "empirical":
        return batch.input_ids[:, 1:].to(logits.device)
    labels = torch.zeros(targets.shape, dtype=torch.long, device=logits.device)
    with torch.no_grad():
        for i, index in enumerate(batch.indices):
            pos = torch.nonzero(targets[i]).flatten()
            if len(pos):
                labels[i, pos] = sample_targets(_rows(logits[i], pos), seed, index, draw)
    return labels


def _rows(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``logits[pos]`` for sorted positions: a view (no vocabulary-sized copy) when they are
    one contiguous run, as for every example whose targets are not interleaved with context."""
    first, last = int(pos[0]), int(pos[-1])
    return logits[first : last + 1] if last - first + 1 == len(pos) else logits[pos]


def _nonfinite(index: int, what: str, describe: Any) -> EstimateError:
    where = describe(index) if describe is not None else f"example {index}"
    return EstimateError(
        f"{where} has a non-finite {what}: pass --skip-nonfinite to skip such examples "
        "(counted in the store metadata), or compute in float32 (--dtype float32)"
    )
