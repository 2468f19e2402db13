"""Data-parallel estimation under ``torchrun``: shard examples, sum-reduce accumulators.

Each rank takes every world_size-th example of the (length-sorted) example order, accumulates
its own squares, and the accumulators and counts are summed with ``all_reduce`` at the end;
rank 0 writes the store. Per-example squares do not depend on batch composition, so the
result equals a single process's up to float summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mergekit_fisher.estimate.config import EstimateError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(use_cuda: bool) -> DistContext:
    """Join the process group torchrun describes in the environment (nothing if WORLD_SIZE<=1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        try:
            dist.init_process_group(backend=backend)
        except Exception as error:
            raise EstimateError(
                f"cannot join the torch.distributed group ({type(error).__name__}: {error}); "
                "launch with torchrun (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set)"
            ) from None
        owns = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        owns_group=owns,
    )


def all_ok(ctx: DistContext, ok: bool) -> bool:
    """Whether every rank finished its shard (so that one failing rank cannot hang the rest)."""
    if not ctx.enabled:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def sum_(ctx: DistContext, tensors: dict[str, torch.Tensor]) -> None:
    """In-place sum over ranks of every tensor (accumulators, counts)."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    device = _comm_device()
    for name in sorted(tensors):
        t = tensors[name]
        if t.device == device:
            dist.all_reduce(t)
        else:
            moved = t.to(device)
            dist.all_reduce(moved)
            t.copy_(moved)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
