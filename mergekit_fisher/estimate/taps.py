"""Taps: identity autograd nodes that hand a module's output (or input) gradient to a callback.

Per-example Fisher needs, at each module, the activation X it saw and the gradient dY that
comes back, per example. A tap is an identity ``autograd.Function`` placed on a module's output
(forward hook) or input (forward pre-hook); it saves X for backward and calls the collector
with (dY, X) when the gradient arrives. Saved tensors go through ``save_for_backward``, so
activation checkpointing (which recomputes saved tensors) works unchanged, and the backward
callback runs exactly once per backward pass.

Parameters keep ``requires_grad=False``: the batch weight gradient (a training step's third
matmul) is never computed; the per-example products replace it. To make gradients flow anyway,
every tap takes an *anchor*, a scalar leaf that requires grad.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Callback = Callable[..., None]


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, anchor: torch.Tensor, callback: Callback, *saved: Any):  # type: ignore[override]
        ctx.callback = callback
        ctx.save_for_backward(*saved)
        # an alias, not a view: a model may add into a tapped output in place (Falcon); it
        # shares y's version counter, so autograd still catches an in-place change to a saved X
        return y.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors  # unpack once: checkpointing forbids a second unpack
        ctx.callback(grad, *saved)
        return (grad, None, None, *([None] * len(saved)))


class BatchState:
    """What taps need to know about the batch in flight: lengths and non-finite screening.

    Default mode only records a per-example sum of each gradient it sees (one reduction, no
    host sync); :meth:`nonfinite` checks them after the backward pass. With ``skip=True`` the
    rows of examples flagged non-finite (before or during backward) are zeroed in every tap,
    so those examples add nothing from that point on.
    """

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.skip = False
        self.bad: torch.Tensor | None = None
        self.signals: list[torch.Tensor] = []
        self.anchors: dict[torch.device, torch.Tensor] = {}
        self.active = False

    def begin(self, lengths: list[int], skip: bool, device: torch.device) -> None:
        self.lengths = list(lengths)
        self.skip = skip
        self.bad = torch.zeros(len(lengths), dtype=torch.bool, device=device)
        self.signals = []
        self.active = True

    def end(self) -> None:
        self.active = False
        self.signals = []

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def anchor(self, device: torch.device) -> torch.Tensor:
        if device not in self.anchors:
            self.anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self.anchors[device]

    def per_example(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor as [B, rows, features]: layers that run on flattened token rows [B*T, .]
        (MoE blocks, Qwen2-MoE's shared expert) see the batch that way."""
        b = self.batch_size
        return tuple(t.reshape(b, -1, t.shape[-1]) for t in tensors)

    def screen(self, grad: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Record (default) or zero (skip mode) the rows of examples with non-finite values;
        returns the tensors per example ([B, rows, features])."""
        grad, *others = self.per_example(grad, *others)
        b = grad.shape[0]
        signal = grad.reshape(b, -1).sum(1, dtype=torch.float32)
        if not self.skip:
            self.signals.append(signal.to(self.bad.device if self.bad is not None else "cpu"))
            return (grad, *others)
        assert self.bad is not None
        bad = self.bad.to(grad.device) | ~torch.isfinite(signal)
        self.bad |= bad.to(self.bad.device)
        keep = ~bad
        return tuple(
            torch.where(
                keep.view(b, *([1] * (t.ndim - 1))),
                t,
                torch.zeros((), dtype=t.dtype, device=t.device),
            )
            for t in (grad, *others)
        )

    def nonfinite(self) -> list[int]:
        """Batch positions whose gradients were non-finite somewhere (one host sync)."""
        assert self.bad is not None
        bad = self.bad.clone()
        if self.signals:
            bad |= ~torch.isfinite(torch.stack([s.to(bad.device) for s in self.signals])).all(0)
        return [int(i) for i in torch.nonzero(bad).flatten().tolist()]


def tap(y: torch.Tensor, state: BatchState, callback: Callback, *saved: Any) -> torch.Tensor:
    """``y`` unchanged; ``callback(dy, *saved)`` runs when its gradient arrives."""
    if not torch.is_grad_enabled():
        return y
    return _Tap.apply(y, state.anchor(y.device), callback, *saved)
