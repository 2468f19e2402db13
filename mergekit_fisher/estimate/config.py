"""Settings of one estimation run, their validation, and the hash that guards ``--resume``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from mergekit_fisher.errors import FisherError

STATISTICS = ("fisher", "gram")
MODES = ("sampled", "empirical")
GRANULARITIES = ("full", "nodes")
NODE_MAPPINGS = ("heads", "paper")
KV_REDUCTIONS = ("group", "sum")
STORE_DTYPES = ("bfloat16", "float32")
DEFAULT_STORE_DTYPES = {"fisher": "bfloat16", "gram": "float32"}
"""bfloat16 keeps a diagonal Fisher's range at half the size; a Gram matrix is solved against,
and rounding an ill-conditioned one to bfloat16 can make it indefinite (docs/merging.md)."""

_DTYPES = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class EstimateError(FisherError):
    """A one-line, user-facing problem with an estimation run: names what and the fix."""


def parse_dtype(name: str | torch.dtype, what: str = "--dtype") -> torch.dtype:
    """A torch dtype from a user's spelling (``bf16``, ``float32``...)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise EstimateError(
            f"{what} {name!r} is not a dtype: use one of float32, bfloat16, float16, float64"
        ) from None


def parse_size(value: int | str, what: str = "--max-gpu-memory") -> int:
    """Bytes from ``24GiB``, ``48GB``, ``512MiB`` or a plain number of bytes (accelerate's
    ``convert_file_size_to_int`` spellings); a one-line error otherwise."""
    from accelerate.utils import convert_file_size_to_int

    text = value.strip() if isinstance(value, str) else value
    try:
        size = convert_file_size_to_int(int(text) if str(text).isdigit() else text)
    except (ValueError, AttributeError, TypeError):
        size = -1
    if not isinstance(size, int) or size <= 0:
        raise EstimateError(
            f"{what} {value!r} is not a memory size: write it like 24GiB, 48GB or 512MiB"
        )
    return size


@dataclass(frozen=True)
class EstimateConfig:
    """Every setting of ``estimate_fisher`` / ``mergekit-fisher estimate`` (CLI names in docs).

    ``dtype=None`` computes in bfloat16 on CUDA and float32 on CPU; ``store_dtype=None`` stores
    Fisher in bfloat16 and Gram matrices in float32 (``DEFAULT_STORE_DTYPES``).
    ``checkpoint_every`` counts batches (0: never). ``max_gpu_memory`` (bytes or ``24GiB``)
    caps what the run keeps on each GPU: ``budget.plan_memory`` decides checkpointing and
    which accumulators live in CPU memory; the result does not change. ``node_mapping``/``kv_heads`` only matter
    for ``granularity="nodes"``; ``statistic="gram"`` (RegMean's input Gram matrices) runs
    forward passes only and ignores ``mode``, ``granularity`` and ``samples_per_example``.
    """

    statistic: str = "fisher"
    mode: str = "sampled"
    granularity: str = "full"
    num_samples: int | None = None
    max_length: int = 512
    batch_size: int = 8
    samples_per_example: int = 1
    store_dtype: str | None = None
    dtype: str | None = None
    device: str = "auto"
    device_map: str | None = None
    gradient_checkpointing: bool = False
    max_gpu_memory: int | str | None = None
    seed: int = 0
    shard_size: int | None = None
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False
    skip_nonfinite: bool = False
    text_field: str = "text"
    split: str = "train"
    pack: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    node_mapping: str = "heads"
    kv_heads: str = "group"
    chunk_bytes: int = 256 * 1024**2
    progress: bool = True

    def __post_init__(self) -> None:
        def choose(field: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                flag = "--" + field.replace("_", "-")
                raise EstimateError(f"{flag} {value!r} is not one of {', '.join(allowed)}")

        choose("statistic", self.statistic, STATISTICS)
        choose("mode", self.mode, MODES)
        choose("granularity", self.granularity, GRANULARITIES)
        choose("node_mapping", self.node_mapping, NODE_MAPPINGS)
        choose("kv_heads", self.kv_heads, KV_REDUCTIONS)
        if self.store_dtype is not None:
            choose("store_dtype", str(self.store_dtype), STORE_DTYPES)
        for field in ("batch_size", "samples_per_example", "max_length"):
            if int(getattr(self, field)) < 1:
                flag = "--" + field.replace("_", "-")
                raise EstimateError(f"{flag} must be at least 1, not {getattr(self, field)}")
        if self.max_length < 2:
            raise EstimateError("--max-length must be at least 2 (one context and one target)")
        if self.checkpoint_every < 0:
            raise EstimateError("--checkpoint-every must be 0 (never) or a number of batches")
        if self.samples_per_example != 1 and self.mode == "empirical":
            raise EstimateError(
                "--samples-per-example only applies to --mode sampled (empirical labels are fixed)"
            )
        if self.device_map not in (None, "auto"):
            raise EstimateError(f"--device-map {self.device_map!r}: only 'auto' is supported")
        if self.dtype is not None:
            parse_dtype(self.dtype)
        if self.max_gpu_memory is not None:
            parse_size(self.max_gpu_memory)

    @property
    def gpu_budget(self) -> int | None:
        """``max_gpu_memory`` in bytes (None: no budget)."""
        return None if self.max_gpu_memory is None else parse_size(self.max_gpu_memory)

    @property
    def stored_as(self) -> str:
        """The store's dtype: ``store_dtype``, or the statistic's default."""
        return self.store_dtype or DEFAULT_STORE_DTYPES[self.statistic]

    def with_(self, **changes: Any) -> EstimateConfig:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_hash(config: EstimateConfig, **context: Any) -> str:
    """What a resumed run must share with the interrupted one (batch size may change)."""
    keys = (
        "statistic",
        "mode",
        "granularity",
        "samples_per_example",
        "seed",
        "max_length",
        "num_samples",
    )
    payload = {k: getattr(config, k) for k in keys}
    payload.update(context)
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
