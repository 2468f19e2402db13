"""The memory plan of an estimate under ``--max-gpu-memory``: what stays on the GPU.

From the model's shapes, the batch shape and the budget, :func:`plan_memory` decides

* gradient checkpointing, when the activations a backward pass keeps would not fit beside the
  weights (Fisher only: Gram statistics run forward passes without a graph);
* which accumulators stay on the device, smallest first, and which live in CPU memory, where
  each batch's contribution arrives through pinned staging buffers (``offload.Accumulators``);
* the rows per float32 chunk of vocabulary-wide work (``engine.logits_rows``, fixed by the
  vocabulary and ``chunk_bytes`` alone, so that a budget never changes a result).

The activation sizes are estimates per token and decoder layer, fitted to the peak memory
measured on an H200 (docs/benchmarks.md); the plan keeps a tenth of the budget spare for the
allocator's fragmentation. Nothing here allocates: an 8B plan is computed from shapes alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mergekit_fisher.estimate.config import EstimateConfig
from mergekit_fisher.estimate.engine import logits_rows
from mergekit_fisher.estimate.gram import SYMMETRIC_BLOCK
from mergekit_fisher.estimate.offload import AccSpec

LOG = logging.getLogger("mergekit_fisher.estimate")

GIB = 1024**3
HEADROOM = 0.1
"""Share of the budget left free: the caching allocator's fragmentation, cuBLAS workspaces."""


def human(n: int) -> str:
    """``24.0 GiB``, ``64.0 KiB``: sizes in the unit that reads best."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class ModelDims:
    """What the plan needs to know of a decoder: its widths, depth and weight bytes."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    weight_bytes: int
    element_bytes: int  # of the compute dtype (2 for bfloat16)


def config_dims(config: Any, weight_bytes: int, element_bytes: int) -> ModelDims:
    """``ModelDims`` from a transformers config (its ``text_config`` for multimodal ones)."""
    config = getattr(config, "text_config", None) or config
    hidden = int(config.hidden_size)
    return ModelDims(
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
        layers=int(config.num_hidden_layers),
        vocab=int(config.vocab_size),
        weight_bytes=weight_bytes,
        element_bytes=element_bytes,
    )


def model_dims(model: Any) -> ModelDims:
    """``ModelDims`` of a loaded (or meta) transformers causal LM."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    return config_dims(model.config, weights, params[0].element_size())


@dataclass(frozen=True)
class Workload:
    """The run's shape: what is estimated, and the largest batch (tokens) it will see."""

    statistic: str  # "fisher" or "gram"
    tokens: int  # batch size x max length
    chunk_bytes: int  # per-example gradient block (full Fisher) and float32 logits chunk
    checkpointing: bool  # asked for by the user (stays on)
    can_checkpoint: bool  # the model supports it


def activation_bytes(dims: ModelDims, work: Workload, checkpointing: bool) -> int:
    """Peak bytes of what one batch keeps alive besides weights and accumulators.

    Per token and layer a Llama-style layer's backward keeps about 18 hidden-wide and 4
    MLP-wide tensors in the compute dtype (measured: 24.9 GiB nodes peak at the 1.1B shape,
    8 x 1024 tokens, bf16). With checkpointing it keeps each layer's input and one layer's
    working set twice over (its recompute and its backward). A Gram forward keeps one layer's
    working set plus the float32 copies of the widest input.
    """
    h, i, e = dims.hidden, dims.intermediate, dims.element_bytes
    layer = e * (18 * h + 4 * i)
    if work.statistic == "gram":
        return work.tokens * (e * (6 * h + 3 * i) + 8 * i)
    if checkpointing:
        return work.tokens * (dims.layers * e * h + 2 * layer)
    return work.tokens * dims.layers * layer


def workload(config: EstimateConfig, can_checkpoint: bool) -> Workload:
    """The ``Workload`` of a run with these settings (its largest batch)."""
    return Workload(
        statistic=config.statistic,
        tokens=config.batch_size * config.max_length,
        chunk_bytes=config.chunk_bytes,
        checkpointing=config.gradient_checkpointing,
        can_checkpoint=can_checkpoint,
    )


def reserve_bytes(dims: ModelDims, work: Workload) -> int:
    """What a device must keep free beside the weights (activations, checkpointed where it
    can be, logits, scratch, spare): accelerate's ``max_memory`` for the weights is the budget
    less this."""
    checkpointing = work.checkpointing or (work.can_checkpoint and work.statistic == "fisher")
    return (
        activation_bytes(dims, work, checkpointing)
        + logits_bytes(dims, work)
        + scratch_bytes(dims, work, dims.intermediate)
    )


def logits_bytes(dims: ModelDims, work: Workload) -> int:
    """The logits and their gradient in the compute dtype, plus three float32 chunks of them."""
    if work.statistic == "gram":
        return 0  # Gram forwards stop at the output layer's input
    chunk = logits_rows(dims.vocab, work.chunk_bytes) * dims.vocab * 4
    return 2 * work.tokens * dims.vocab * dims.element_bytes + 3 * chunk


def scratch_bytes(dims: ModelDims, work: Workload, largest: int) -> int:
    """Reused buffers: per-example gradient blocks and their sums (full Fisher), or one Gram
    block; ``largest`` is the widest accumulator row count (a Gram's side)."""
    if work.statistic == "gram":
        return SYMMETRIC_BLOCK * largest * 4
    return 2 * work.chunk_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """Where each accumulator lives, whether layers recompute, and the bytes behind it."""

    budget: int
    device: str
    checkpointing: bool
    resident: tuple[str, ...]
    offloaded: tuple[str, ...]
    logits_rows: int
    bytes: Mapping[str, int]  # weights, activations, logits, scratch, headroom, accumulators
    fits: bool

    def log(self) -> None:
        """One INFO line per decision."""
        b = {k: human(v) for k, v in self.bytes.items()}
        LOG.info(
            "memory plan for %s on %s: weights %s, activations %s, logits %s, scratch %s, "
            "%s spare%s",
            human(self.budget), self.device, b["weights"], b["activations"], b["logits"],
            b["scratch"], b["headroom"], "" if self.fits else " (does not fit even so)",
        )  # fmt: skip
        LOG.info(
            "gradient checkpointing %s (activations without it: %s)",
            "on" if self.checkpointing else "off",
            b["activations_plain"],
        )
        LOG.info("logits: float32 work in chunks of %d rows", self.logits_rows)
        LOG.info(
            "accumulators on %s: %d tensors, %s", self.device, len(self.resident), b["resident"]
        )
        LOG.info(
            "accumulators in CPU memory, added per batch through pinned buffers: %d tensors, %s",
            len(self.offloaded),
            b["offloaded"],
        )

    def to_json(self) -> dict[str, Any]:
        """What the store's metadata records of the plan."""
        return {
            "max_gpu_memory": self.budget,
            "gradient_checkpointing": self.checkpointing,
            "offloaded_accumulators": len(self.offloaded),
            "offloaded_bytes": self.bytes["offloaded"],
            "resident_accumulators": len(self.resident),
        }


def plan_memory(
    budget: int, dims: ModelDims, accumulators: Mapping[str, int], work: Workload, device: str
) -> MemoryPlan:
    """The plan for ``accumulators`` (name -> bytes) under ``budget`` bytes on ``device``.

    Checkpointing goes on when the plain activations would not leave room beside the weights
    and working buffers; then the smallest accumulators stay on the device while they fit
    (many small tensors cost the most per byte to ship), the rest go to CPU memory.
    """
    largest = max((int((n // 4) ** 0.5) for n in accumulators.values()), default=0)
    need = {
        "weights": dims.weight_bytes,
        "logits": logits_bytes(dims, work),
        "scratch": scratch_bytes(dims, work, largest),
        "headroom": int(budget * HEADROOM),
        "activations_plain": activation_bytes(dims, work, checkpointing=False),
    }
    fixed = need["weights"] + need["logits"] + need["scratch"] + need["headroom"]
    checkpointing = work.checkpointing or (
        work.can_checkpoint
        and work.statistic == "fisher"
        and fixed + need["activations_plain"] > budget
    )
    need["activations"] = activation_bytes(dims, work, checkpointing)
    room = budget - fixed - need["activations"]
    resident: list[str] = []
    for name in sorted(accumulators, key=lambda n: (accumulators[n], n)):
        if accumulators[name] > room:
            break
        room -= accumulators[name]
        resident.append(name)
    offloaded = tuple(sorted(set(accumulators) - set(resident)))
    need["resident"] = sum(accumulators[n] for n in resident)
    need["offloaded"] = sum(accumulators[n] for n in offloaded)
    return MemoryPlan(
        budget=budget,
        device=device,
        checkpointing=checkpointing,
        resident=tuple(resident),
        offloaded=offloaded,
        logits_rows=logits_rows(dims.vocab, work.chunk_bytes),
        bytes=need,
        fits=room >= 0,
    )


def plan_devices(
    model: Any, specs: Mapping[str, AccSpec], config: EstimateConfig
) -> list[MemoryPlan]:
    """One plan per GPU that computes accumulators (under ``device_map``, each with the weights
    it holds); on a CPU-only run, the CPU is planned as if it were a GPU (the tests' way to
    take the offloaded path)."""
    budget = config.gpu_budget
    if budget is None:
        return []
    can = bool(getattr(model, "supports_gradient_checkpointing", False))
    dims, work = model_dims(model), workload(config, can)
    homes = {spec.home for spec in specs.values()}
    devices = sorted((d for d in homes if d.type != "cpu"), key=str) or sorted(homes, key=str)
    plans = []
    for device in devices:
        weights = sum(
            p.numel() * p.element_size() for p in model.parameters() if p.device == device
        )
        sizes = {name: s.nbytes for name, s in specs.items() if s.home == device}
        on_device = replace(dims, weight_bytes=weights)
        plans.append(plan_memory(budget, on_device, sizes, work, str(device)))
    return plans
