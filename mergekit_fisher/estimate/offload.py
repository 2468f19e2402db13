"""Accumulators that stay on their device or live in CPU memory, with the same result.

Every collector adds a batch's contribution to an accumulator in one call, ``add`` (or
``index_add`` for embedding rows): the contribution is computed on the weight's device (its
*home*) into a reused scratch. A resident accumulator adds it there. An offloaded one, which
lives in CPU memory, gets it through a pinned staging buffer (``copy_(non_blocking=True)``
plus a CUDA event) and a single worker thread that adds it on the CPU while the GPU goes on
with the next block; two staging buffers alternate. The worker runs the adds in submission
order and the contribution is the same tensor either way, so an offloaded run is bit-identical
to a resident one (float addition is IEEE-exact on both sides). :meth:`Accumulators.flush`
waits for the pending adds; a collector's ``accumulators`` calls it, so that whatever reads them
(checkpoints, the reduction, the store) sees every add. The two staging buffers bound how far
the CPU adds may lag behind the GPU.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

STAGING_BUFFERS = 2


@dataclass(frozen=True)
class AccSpec:
    """An accumulator's shape and dtype, and the device its contributions are computed on."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    home: torch.device

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Scratch:
    """Flat buffers kept between calls, one per (purpose, device, dtype), grown on demand."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def get(
        self, purpose: str, numel: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        key = (purpose, device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


class Accumulators:
    """Named accumulators: declared (shapes only), then allocated on their home device or,
    for the names in ``offload``, in CPU memory."""

    def __init__(self) -> None:
        self.specs: dict[str, AccSpec] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.offloaded: frozenset[str] = frozenset()
        self._worker: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(STAGING_BUFFERS):  # grown to the largest contribution on first use
            self._free.put(torch.empty(0, dtype=torch.uint8))

    def declare(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, home: Any) -> None:
        self.specs[name] = AccSpec(tuple(shape), dtype, torch.device(home))

    def allocate(self, offload: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """Zeroed accumulators: offloaded names in CPU memory, the rest at home."""
        self.offloaded = frozenset(offload)
        for name, spec in self.specs.items():
            where = torch.device("cpu") if name in self.offloaded else spec.home
            self.tensors[name] = torch.zeros(spec.shape, dtype=spec.dtype, device=where)
        return self.tensors

    def add(self, name: str, contribution: torch.Tensor, index: tuple[Any, ...] = ()) -> None:
        """``acc[index] += contribution``; ``contribution`` may be reused once this returns."""
        target = self.tensors[name][index] if index else self.tensors[name]
        if name not in self.offloaded:
            target.add_(contribution)
            return
        staged, buf, event = self._stage(contribution)
        self._submit(lambda: target.add_(staged), buf, event)

    def index_add(self, name: str, index: torch.Tensor, rows: torch.Tensor) -> None:
        """``acc.index_add_(0, index, rows)`` (embedding rows of one example)."""
        acc = self.tensors[name]
        if name not in self.offloaded:
            acc.index_add_(0, index, rows)
            return
        index, rows = index.to("cpu"), rows.to("cpu")  # rows of one example: small, synchronous
        self._submit(lambda: acc.index_add_(0, index, rows), None, None)

    def flush(self) -> None:
        """Wait for every pending CPU add (re-raising the first failure)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _stage(self, contribution: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """A CPU copy of ``contribution`` in a free staging buffer (pinned for a GPU source),
        and the CUDA event that says when the copy has landed."""
        nbytes = contribution.numel() * contribution.element_size()
        buf = self._free.get()
        if buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=contribution.is_cuda)
        staged = buf[:nbytes].view(contribution.dtype).view(contribution.shape)
        staged.copy_(contribution, non_blocking=contribution.is_cuda)
        event = None
        if contribution.is_cuda:
            event = torch.cuda.Event()
            event.record()
        return staged, buf, event

    def _submit(self, add: Any, buf: torch.Tensor | None, event: Any) -> None:
        def run() -> None:
            try:
                if event is not None:
                    event.synchronize()
                add()
            finally:
                if buf is not None:
                    self._free.put(buf)

        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="fisher-offload")
        self._pending.append(self._worker.submit(run))


class Banked:
    """A collector whose accumulators live in ``bank`` (declared in its constructor, allocated
    by ``runner.make_collector`` once the memory plan is known)."""

    bank: Accumulators

    @property
    def accumulators(self) -> dict[str, torch.Tensor]:
        """The accumulators, every pending offloaded add landed (what checkpoints, the
        reduction and the results read)."""
        self.bank.flush()
        return self.bank.tensors
