"""Input Gram matrices of every linear layer, for RegMean (``estimate --statistic gram``).

G = (1/N) sum over non-padding tokens of x x^T, where x is a linear layer's input and N the
number of such tokens. Layers that read the same tensor (q/k/v projections, gate/up) share one
Gram: forward hooks key each input by the identity of the tensor object within one forward
pass, so the grouping needs no architecture knowledge. Only forward passes run, and each stops
at the output layer's input when nothing after it feeds a Gram (the logits are never formed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mergekit_fisher.estimate.config import EstimateError
from mergekit_fisher.estimate.engine import input_device
from mergekit_fisher.estimate.full import accumulator_dtype, is_conv1d
from mergekit_fisher.estimate.offload import Accumulators, Banked, Scratch
from mergekit_fisher.estimate.taps import BatchState

ACCUMULATED_TOKENS = "__tokens__"
SYMMETRIC_BLOCK = 384
"""Rows per block of a Gram update: X^T X is symmetric, so only the blocks on and above the
diagonal are multiplied ((k + 1) / 2k of the products for k blocks) and ``fisher`` mirrors."""


class _OutputReached(Exception):
    """Raised by the output layer's pre-hook once its input is recorded: the rest of the
    forward pass (the logits) feeds no Gram."""


class GramCollector(Banked):
    """Forward pre-hooks on every ``nn.Linear``; owns the Gram sums per distinct input.

    The sums are float32 (float64 when the model computes in float64), like the Fisher's
    accumulators: float64 sums of every [in, in] input would need 65 GB for an 8B Llama, more
    than an 80 GB GPU has beside the model. Each batch adds its blocks once (:func:`add_upper`); over B batches
    the relative rounding is about sqrt(B) * 6e-8 (B * 6e-8 at worst: 6e-5 after 1000
    batches), far below the sampling noise of the calibration data.

    A linear layer tied to an embedding (``lm_head`` with tied embeddings) is skipped: its
    weight arrives at merge time as the embedding, which is not a linear map of its inputs.
    Accumulators are declared by one tiny discovery forward, so that every rank (and a resumed
    run) has the same keys before any data is seen; ``__tokens__`` counts non-padding tokens.
    ``model`` may also be one decoder block: ``discover`` then runs it on a tiny input, and
    :meth:`run` on each batch's hidden states (``regmean-plus``).
    """

    granularity = "full"

    def __init__(
        self, model: nn.Module, state: BatchState, discover: Callable[[], object] | None = None
    ):
        refuse_conv1d(model)
        self.model = model
        self.state = state  # the collector protocol's; forward-only runs need no batch state
        self.consumers: dict[str, str] = {}
        self.bank = Accumulators()
        self.bank.declare(ACCUMULATED_TOKENS, (), torch.float64, "cpu")
        self._scratch = Scratch()
        self._mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._calls: list[nn.Module] = []
        self._stop_at: nn.Module | None = None
        self._handles: list[Any] = []
        self._params = dict(model.named_parameters())
        self.install()
        try:
            if discover is None:
                device = input_device(model)
                ids = torch.zeros(1, 2, dtype=torch.long, device=device)
                self.forward(ids, torch.ones(1, 2, device=device))
            else:
                self.run(discover, None)
        finally:
            self.remove()
        self._stop_at = self._last_layer()

    def _last_layer(self) -> nn.Module | None:
        """The output embedding, when the discovery forward ran it once and as the last linear
        layer: forward passes may stop at its input."""
        try:
            output = self.model.get_output_embeddings()  # type: ignore[operator]
        except (AttributeError, NotImplementedError):
            return None
        calls = self._calls
        if calls and calls[-1] is output and calls.count(output) == 1:
            return output
        return None

    def install(self) -> None:
        tied = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        self._handles = [
            module.register_forward_pre_hook(self._hook(name, id(module.weight) not in tied))
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Linear)
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str, record: bool):  # type: ignore[no-untyped-def]
        """A pre-hook adding the Gram of the module's input (once per distinct input tensor);
        a linear layer tied to an embedding only counts as called."""

        def pre(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self._calls.append(module)
            if record:
                self._record(name, inputs[0])
            if module is self._stop_at:
                raise _OutputReached

        return pre

    def _record(self, name: str, x: torch.Tensor) -> None:
        seen = self._seen.get(id(x))
        if seen is None or seen[0] is not x:
            seen = self._seen[id(x)] = (x, f"{name}.input")
            rows = x.detach().reshape(-1, x.shape[-1])
            if self._mask is not None:
                rows = rows[self._mask.reshape(-1).to(rows.device)]
            spec = self.bank.specs.get(seen[1])
            if spec is None:  # the discovery forward: the accumulator's shape, dtype and device
                n, dtype = rows.shape[1], accumulator_dtype(rows.dtype)
                self.bank.declare(seen[1], (n, n), dtype, rows.device)
            else:
                add_upper(
                    self.bank, seen[1], gram_rows(rows, spec.dtype), self._scratch, spec.dtype
                )
        self.consumers[f"{name}.weight"] = seen[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """One forward pass: adds the Grams of the batch's non-padding tokens; returns their count."""
        return self.run(
            lambda: self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
            attention_mask,
        )

    def run(self, call: Callable[[], object], attention_mask: torch.Tensor | None) -> int:
        """Run ``call``, a forward through ``model`` (a whole model or one decoder block fed
        its hidden states), adding the Grams of the tokens where ``attention_mask`` [B, T] is
        set (all of them for None); returns their count."""
        self._mask = None if attention_mask is None else attention_mask.bool()
        self._calls = []
        try:
            with torch.no_grad(), contextlib.suppress(_OutputReached):
                call()
            tokens = 0 if self._mask is None else int(self._mask.sum())
        finally:
            self._mask = None
            self._seen.clear()
        if self.accumulators:  # not in the discovery forward
            self.accumulators[ACCUMULATED_TOKENS] += tokens
        return tokens

    def fisher(self, count: float) -> dict[str, torch.Tensor]:
        """The Gram means (float32), by input key; ``count`` is unused (tokens are counted)."""
        tokens = float(self.accumulators[ACCUMULATED_TOKENS])
        return {
            key: (mirror_upper(acc) / max(tokens, 1.0)).float()
            for key, acc in self.accumulators.items()
            if key != ACCUMULATED_TOKENS
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights each Gram describes (the store binds to them)."""
        return {name: self._params[name] for name in self.consumers}


def tensor_core_gram(rows: torch.Tensor, acc_dtype: torch.dtype) -> bool:
    """Whether rows^T rows can run on CUDA tensor cores in the rows' own half precision with
    a float32 result (``torch.mm(..., out_dtype=float32)``): the products of two bf16/fp16
    values are exact in float32 and the sum is float32 either way, so this equals the float32
    product of upcast rows up to summation order, at several times float32's speed."""
    return (
        rows.is_cuda
        and rows.dtype in (torch.bfloat16, torch.float16)
        and acc_dtype == torch.float32
    )


def gram_rows(rows: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """The rows as ``add_upper`` multiplies them: as they are for tensor cores, else upcast."""
    return rows if tensor_core_gram(rows, acc_dtype) else rows.to(acc_dtype)


def add_upper(
    bank: Accumulators,
    key: str,
    rows: torch.Tensor,
    scratch: Scratch,
    acc_dtype: torch.dtype = torch.float32,
) -> None:
    """Gram ``key`` += rows^T rows on and above the diagonal, a block of ``SYMMETRIC_BLOCK``
    rows at a time: each block's product goes into one reused ``acc_dtype`` scratch block (no
    [in, in] temporary) and is added to the accumulator, resident or offloaded alike; below the
    diagonal is left as it was. Half-precision CUDA rows multiply on tensor cores
    (``tensor_core_gram``); other rows must already be in ``acc_dtype``."""
    n = rows.shape[1]
    dtype = acc_dtype if tensor_core_gram(rows, acc_dtype) else rows.dtype
    extra = {"out_dtype": dtype} if dtype != rows.dtype else {}
    for i in range(0, n, SYMMETRIC_BLOCK):
        j = min(i + SYMMETRIC_BLOCK, n)
        block = scratch.get("gram", (j - i) * (n - i), dtype, rows.device)
        torch.mm(rows[:, i:j].T, rows[:, i:], out=block.view(j - i, n - i), **extra)
        bank.add(key, block.view(j - i, n - i), (slice(i, j), slice(i, None)))


def mirror_upper(acc: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``acc``'s."""
    upper = acc.triu()
    return upper + upper.triu(1).T


def refuse_conv1d(model: nn.Module) -> None:
    """GPT-2-style ``Conv1D`` weights are [in, out]: the ``regmean`` solve assumes [out, in]."""
    name = next((n for n, m in model.named_modules() if is_conv1d(m)), None)
    if name is not None:
        raise EstimateError(
            f"{type(model).__name__}: {name!r} is a transformers Conv1D (GPT-2 family), which "
            "--statistic gram does not support yet; use --statistic fisher for this model"
        )
