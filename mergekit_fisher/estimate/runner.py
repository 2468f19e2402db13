"""``estimate_fisher``: model + calibration data -> a Fisher store, with progress and resume.

This module owns the run around the math: loading model, tokenizer and data; device and dtype
choice; example order and sharding; the progress bar; checkpoints; the reduction across ranks;
and the store write. The per-example math lives in engine/full/moe/nodes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mergekit_fisher.estimate import budget, checkpoint, distributed
from mergekit_fisher.estimate.config import EstimateConfig, EstimateError, parse_dtype, run_hash
from mergekit_fisher.estimate.engine import BatchOutcome, collate, input_device, run_batch
from mergekit_fisher.estimate.gram import GramCollector
from mergekit_fisher.estimate.moe import MoeFullCollector, eager_experts_in_float64
from mergekit_fisher.estimate.nodes import NodeCollector
from mergekit_fisher.estimate.taps import BatchState

if TYPE_CHECKING:
    from mergekit_fisher.data import CalibrationData, Example
    from mergekit_fisher.store import FisherStore

LOG = logging.getLogger("mergekit_fisher.estimate")


@dataclass
class Progress:
    """Handed to ``callback`` after every batch (and its checkpoint, if one was due)."""

    batches: int
    examples: int
    tokens: int
    total_examples: int


@dataclass
class FisherResult:
    """An in-memory estimate: tensors by weight name plus what the store metadata records."""

    fisher: dict[str, torch.Tensor]
    num_sequences: int
    num_tokens: int
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    collector: Any = None


def longest_first(examples: Sequence[Example]) -> list[int]:
    """Longest first (little padding per batch; an out-of-memory shows at once), stable."""
    return sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))


def make_collector(model: nn.Module, state: BatchState, config: EstimateConfig) -> Any:
    """The statistic's collector, its accumulators placed by the memory plan (``plans``: one
    per planned device; none without ``max_gpu_memory``), checkpointing on if a plan says so."""
    if config.statistic == "gram":
        collector: Any = GramCollector(model, state)
    elif config.granularity == "nodes":
        collector = NodeCollector(
            model, state, mapping=config.node_mapping, kv_heads=config.kv_heads
        )
    else:
        collector = MoeFullCollector(model, state, chunk_bytes=config.chunk_bytes)
    collector.plans = budget.plan_devices(model, collector.bank.specs, config)
    for plan in collector.plans:
        plan.log()
        if not plan.fits and plan.device != "cpu":
            raise EstimateError(_does_not_fit(plan, config))
    if any(p.checkpointing for p in collector.plans) and not config.gradient_checkpointing:
        enable_checkpointing(model)
    collector.bank.allocate({name for p in collector.plans for name in p.offloaded})
    return collector


def _does_not_fit(plan: budget.MemoryPlan, config: EstimateConfig) -> str:
    need = plan.bytes["weights"] + plan.bytes["activations"] + plan.bytes["logits"]
    return (
        f"--max-gpu-memory {config.max_gpu_memory}: {plan.device} needs "
        f"{need / budget.GIB:.1f} GiB for weights, activations and logits of a batch of "
        f"{config.batch_size} x {config.max_length} tokens even with every accumulator in CPU "
        "memory: lower --batch-size or --max-length, or spread the model with --device-map auto"
    )


def prepare_model(model: nn.Module, config: EstimateConfig) -> nn.Module:
    """Eval mode (no dropout), no parameter gradients, float64-capable experts, optional
    activation checkpointing."""
    model.eval()
    model.requires_grad_(False)
    eager_experts_in_float64(model)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (the taps save through ``save_for_backward``,
    so the recompute hands them the same tensors), dropout still off."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise EstimateError(
            f"{type(model).__name__} does not support gradient checkpointing: drop "
            "--gradient-checkpointing"
        )
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    # transformers checkpoints a layer only in training mode; flip just the layers (not
    # their children), so dropout stays off everywhere.
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def compute_fisher(
    model: nn.Module,
    examples: Sequence[Example],
    config: EstimateConfig | None = None,
    *,
    indices: Sequence[int] | None = None,
    start: int = 0,
    collector: Any = None,
    on_batch: Callable[[int, BatchOutcome, int], None] | None = None,
    describe: Callable[[int], str] | None = None,
) -> FisherResult:
    """Accumulate the Fisher of an in-memory model over ``examples`` (no store, no ranks).

    ``indices`` is the order to process (default: longest first) and ``start`` where in it to
    begin (resume). ``on_batch(position, outcome, batch_tokens)`` runs after each batch. Returns
    unnormalised sums in the collector and the normalised tensors in ``fisher``.
    """
    config = config or EstimateConfig()
    state = BatchState()
    owned = collector is None
    if owned:
        prepare_model(model, config)
        collector = make_collector(model, state, config)
    else:
        state = collector.state
    order = list(indices) if indices is not None else longest_first(examples)
    device = input_device(model)
    counted = tokens = 0
    skipped: list[int] = []
    began = time.perf_counter()
    collector.install()
    try:
        for pos in range(start, len(order), config.batch_size):
            chosen = order[pos : pos + config.batch_size]
            batch = collate([examples[i] for i in chosen], chosen, device)
            if isinstance(collector, GramCollector):
                tokens_seen = collector.forward(batch.input_ids, batch.attention_mask)
                outcome = BatchOutcome(counted=len(chosen), tokens=tokens_seen)
            else:
                outcome = run_batch(
                    model,
                    batch,
                    state,
                    mode=config.mode,
                    samples_per_example=config.samples_per_example,
                    seed=config.seed,
                    skip_nonfinite=config.skip_nonfinite,
                    describe=describe,
                    chunk_bytes=config.chunk_bytes,
                )
            counted += outcome.counted
            tokens += outcome.tokens
            skipped.extend(outcome.skipped)
            if on_batch is not None:
                on_batch(pos + len(chosen), outcome, sum(batch.lengths))
    finally:
        collector.remove()
    draws = config.samples_per_example if config.mode == "sampled" else 1
    fisher = collector.fisher(max(counted, 1) * draws) if owned else {}
    return FisherResult(fisher, counted, tokens, skipped, time.perf_counter() - began, collector)


# --------------------------------------------------------------------------- loading


def resolve_device(config: EstimateConfig, ctx: distributed.DistContext) -> torch.device:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EstimateError(
            f"--device {config.device!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EstimateError(
                f"--device {config.device}: no CUDA device is available; use --device cpu"
            )
        if ctx.enabled and device.index is None:
            device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    return device


def _load_model(
    ref: str,
    config: EstimateConfig,
    device: torch.device,
    dtype: torch.dtype,
    ctx: distributed.DistContext,
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "revision": config.revision,
        "trust_remote_code": config.trust_remote_code,
        "dtype": dtype,
    }
    if config.device_map == "auto":
        kwargs["device_map"] = "auto"
        if device.type == "cuda" and (ctx.enabled or config.gpu_budget is not None):
            kwargs["max_memory"] = _max_memory(ref, config, dtype, ctx)
    try:
        with _transformers_bars(config.progress):
            model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise EstimateError(
            f"cannot load model {ref!r} ({first_line[:200]}): pass a local model directory or a "
            "Hub id (online, or already in the Hugging Face cache)"
        ) from None
    if config.device_map is None:
        model.to(device)
    return model


def _max_memory(
    ref: str, config: EstimateConfig, dtype: torch.dtype, ctx: distributed.DistContext
) -> dict[int, int]:
    """accelerate's ``max_memory`` for the weights: this rank's slice of the node's GPUs (each
    rank spreads its own model copy), each capped at the budget less the run's working set."""
    count = torch.cuda.device_count()
    per_rank = max(count // max(ctx.local_world_size, 1), 1) if ctx.enabled else count
    first = (ctx.local_rank * per_rank) % count if ctx.enabled else 0
    caps = {
        i: torch.cuda.get_device_properties(i).total_memory for i in range(first, first + per_rank)
    }
    limit = config.gpu_budget
    if limit is not None:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(
            ref, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
        dims = budget.config_dims(model_config, 0, dtype.itemsize)
        work = budget.workload(config, can_checkpoint=True)
        reserve = budget.reserve_bytes(dims, work) + int(limit * budget.HEADROOM)
        caps = {i: max(min(cap, limit - reserve), 0) for i, cap in caps.items()}
        LOG.info(
            "weights placed with max_memory %s (budget less %.1f GiB)", caps, reserve / budget.GIB
        )
    return caps


@contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers' own bars (``Loading weights``) on or off, as ``--no-progress`` says."""
    from transformers.utils import logging as hf_logging

    silence = not enabled and hf_logging.is_progress_bar_enabled()
    if silence:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if silence:
            hf_logging.enable_progress_bar()


def _load_tokenizer(ref: str, config: EstimateConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            ref, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise EstimateError(
            f"cannot load the tokenizer of {ref!r} ({first_line[:200]}): the model needs its "
            "tokenizer files, or pass tokenizer= to estimate_fisher"
        ) from None


# --------------------------------------------------------------------------- the run


def estimate_fisher(
    model: str | os.PathLike[str] | nn.Module,
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | CalibrationData,
    out: str | os.PathLike[str],
    config: EstimateConfig | None = None,
    *,
    tokenizer: Any = None,
    callback: Callable[[Progress], None] | None = None,
    **overrides: Any,
) -> FisherStore | None:
    """Estimate the diagonal Fisher of a causal LM on calibration data and write a store.

    ``model`` is a local directory, a Hub id, or a loaded ``PreTrainedModel``; ``data`` is one
    or more calibration sources (see ``mergekit_fisher.data``) or a loaded ``CalibrationData``.
    Settings come from ``config`` and/or keyword overrides (``EstimateConfig`` fields). Returns
    the written store (``None`` on ranks other than 0 under torchrun). Raises
    :class:`EstimateError` (a ``FisherError``) for bad inputs, before anything is written.
    """
    config = _settle_config(config, overrides)
    out = Path(out)
    ckpt_dir = _check_out(out, config)
    ctx = distributed.init_from_env(use_cuda=config.device != "cpu" and torch.cuda.is_available())
    try:
        device = resolve_device(config, ctx)
        ref, loaded, dtype = _identify_model(model, config, device)
        calib = load_calibration(data, ref, tokenizer, config)
        if loaded is None:
            loaded = _load_model(ref, config, device, dtype, ctx)
        run = _start_run(loaded, ref, calib, config, ctx, ckpt_dir)
        seconds = _accumulate(run, config, ctx, callback)
        counts = _reduce(run, ctx)
        store = _write(out, run, config, ctx, counts, seconds) if ctx.is_main else None
        distributed.barrier(ctx)
        return store
    finally:
        distributed.shutdown(ctx)


@dataclass
class _Run:
    """One rank's share of an estimate: what it processes, what it has tallied so far (restored
    from a checkpoint on resume), and where its checkpoints go."""

    model: nn.Module
    ref: str
    dtype: torch.dtype
    calib: CalibrationData
    collector: Any
    order: list[int]
    key: str
    ckpt_dir: Path
    start: int = 0
    counted: int = 0
    tokens: int = 0
    batches: int = 0
    skipped: list[int] = field(default_factory=list)

    @property
    def sources(self) -> str:
        return ", ".join(self.calib.sources)


def _settle_config(config: EstimateConfig | None, overrides: dict[str, Any]) -> EstimateConfig:
    """``config`` with keyword overrides applied; warns about a lossy Gram store dtype."""
    config = config or EstimateConfig()
    if overrides:
        config = config.with_(**overrides)
    if config.statistic == "gram" and config.stored_as == "bfloat16":
        LOG.warning(
            "--store-dtype bfloat16 for Gram matrices: rounding can make an ill-conditioned Gram "
            "indefinite and spoil the regmean solve (alpha 1 above all); float32 is the default"
        )
    return config


def _check_out(out: Path, config: EstimateConfig) -> Path:
    """Refuse an output (or a leftover checkpoint) we may not touch; returns the checkpoint dir."""
    from mergekit_fisher.store import check_out_dir

    check_out_dir(out, overwrite=config.overwrite)
    ckpt_dir = checkpoint.checkpoint_dir(out)
    if checkpoint.exists(ckpt_dir) and not config.resume and not config.overwrite:
        raise EstimateError(
            f"{ckpt_dir} holds a checkpoint of an interrupted run: pass --resume to continue "
            "it, or --overwrite to start over"
        )
    return ckpt_dir


def _identify_model(
    model: str | os.PathLike[str] | nn.Module, config: EstimateConfig, device: torch.device
) -> tuple[str, nn.Module | None, torch.dtype]:
    """(name recorded in the store, the model if already loaded, the dtype to load it in)."""
    if isinstance(model, nn.Module):
        ref = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        return str(ref), model, next(model.parameters()).dtype
    return os.fspath(model), None, load_dtype(config, device)


def load_dtype(config: EstimateConfig, device: torch.device) -> torch.dtype:
    """``--dtype``, else bfloat16 on CUDA and float32 on CPU."""
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(config.dtype) if config.dtype else default


def load_calibration(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | CalibrationData,
    ref: str,
    tokenizer: Any,
    config: EstimateConfig,
) -> CalibrationData:
    """The calibration examples, tokenized with ``tokenizer`` (default: the model's own)."""
    from mergekit_fisher.data import CalibrationData, load_calibration_data

    if isinstance(data, CalibrationData):
        return data
    if tokenizer is None:
        tokenizer = _load_tokenizer(ref, config)
    sources = (
        [os.fspath(data)] if isinstance(data, (str, os.PathLike)) else [os.fspath(s) for s in data]
    )
    return load_calibration_data(
        sources,
        tokenizer,
        max_length=config.max_length,
        num_samples=config.num_samples,
        text_field=config.text_field,
        split=config.split,
        pack=config.pack,
    )


def _start_run(
    model: nn.Module,
    ref: str,
    calib: CalibrationData,
    config: EstimateConfig,
    ctx: distributed.DistContext,
    ckpt_dir: Path,
) -> _Run:
    """Prepare the model and collector, pick this rank's examples, and resume if asked."""
    dtype = next(model.parameters()).dtype
    prepare_model(model, config)
    collector = make_collector(model, BatchState(), config)
    examples = calib.examples
    key = run_hash(
        config,
        model=ref,
        revision=config.revision,
        data=calib.fingerprint,
        dtype=str(dtype),
        world_size=ctx.world_size,
        num_examples=len(examples),
    )
    order = longest_first(examples)[ctx.rank :: ctx.world_size]
    run = _Run(model, ref, dtype, calib, collector, order, key, ckpt_dir)
    if config.resume and checkpoint.exists(ckpt_dir):
        saved = checkpoint.load(ckpt_dir, ctx.rank, ctx.world_size, key)
        for name, acc in collector.accumulators.items():
            acc.copy_(saved["accumulators"][name].to(acc.device))
        run.start, run.counted, run.tokens = saved["position"], saved["counted"], saved["tokens"]
        run.batches, run.skipped = saved["batches"], list(saved["skipped"])
        LOG.info("resuming from %s: %d of %d examples done", ckpt_dir, run.start, len(order))
    elif config.overwrite and ctx.is_main:
        checkpoint.remove(ckpt_dir)
    return run


def _accumulate(
    run: _Run,
    config: EstimateConfig,
    ctx: distributed.DistContext,
    callback: Callable[[Progress], None] | None,
) -> float:
    """Run this rank's batches from ``run.start``, with progress and checkpoints; seconds taken.
    Fails on every rank if any rank failed."""
    examples = run.calib.examples
    total_tokens = sum(len(examples[i].input_ids) for i in run.order)
    done_tokens = sum(len(examples[i].input_ids) for i in run.order[: run.start])
    bar = _progress_bar(config, ctx, total_tokens, done_tokens)

    def describe(index: int) -> str:
        return f"example {index} (0-based) of {run.sources}"

    def on_batch(position: int, outcome: BatchOutcome, width: int) -> None:
        run.counted += outcome.counted
        run.tokens += outcome.tokens
        run.batches += 1
        run.skipped.extend(outcome.skipped)
        if bar is not None:
            bar.update(width)
        if config.checkpoint_every and run.batches % config.checkpoint_every == 0:
            _save_checkpoint(run, ctx, position)
        if callback is not None:
            callback(Progress(run.batches, position, run.tokens, len(run.order)))

    began = time.perf_counter()
    ok = False
    try:
        compute_fisher(
            run.model,
            examples,
            config,
            indices=run.order,
            start=run.start,
            collector=run.collector,
            on_batch=on_batch,
            describe=describe,
        )
        ok = True
    finally:
        if bar is not None:
            bar.close()
        if not distributed.all_ok(ctx, ok) and ok:
            raise EstimateError("another rank failed (see its error above): nothing was written")
    return time.perf_counter() - began


def _save_checkpoint(run: _Run, ctx: distributed.DistContext, position: int) -> None:
    checkpoint.save(
        run.ckpt_dir,
        ctx.rank,
        ctx.world_size,
        {
            "hash": run.key,
            "position": position,
            "counted": run.counted,
            "tokens": run.tokens,
            "batches": run.batches,
            "skipped": run.skipped,
            "accumulators": run.collector.accumulators,
        },
    )


def _reduce(run: _Run, ctx: distributed.DistContext) -> dict[str, int]:
    """Sum the counts and accumulators over ranks; refuses a run that counted nothing."""
    counts = {
        "counted": torch.tensor([run.counted], dtype=torch.float64),
        "tokens": torch.tensor([run.tokens], dtype=torch.float64),
        "skipped": torch.tensor([len(run.skipped)], dtype=torch.float64),
    }
    distributed.sum_(ctx, counts)
    distributed.sum_(ctx, run.collector.accumulators)
    totals = {name: int(value.item()) for name, value in counts.items()}
    if totals["counted"] == 0:
        raise EstimateError(
            f"every example of {run.sources} was skipped as non-finite: nothing to write; "
            "check the model (--dtype float32)"
        )
    return totals


def _write(
    out: Path,
    run: _Run,
    config: EstimateConfig,
    ctx: distributed.DistContext,
    counts: dict[str, int],
    seconds: float,
) -> FisherStore:
    """Write the store (rank 0), drop the checkpoint and log one summary line."""
    from mergekit_fisher.store import DEFAULT_SHARD_SIZE, write_store

    draws = config.samples_per_example if config.mode == "sampled" else 1
    gram = isinstance(run.collector, GramCollector)
    store = write_store(
        out,
        run.collector.fisher(counts["counted"] * draws),
        weights=run.collector.weights(),
        statistic=config.statistic,
        consumers=run.collector.consumers if gram else None,
        model=run.ref,
        revision=config.revision,
        granularity=config.granularity,
        estimator=_estimator_metadata(run, config, ctx, counts, draws),
        store_dtype=parse_dtype(config.stored_as, "--store-dtype"),
        shard_size=config.shard_size or DEFAULT_SHARD_SIZE,
        overwrite=config.overwrite,
    )
    checkpoint.remove(run.ckpt_dir)
    rate = counts["tokens"] / seconds if seconds > 0 else float("inf")
    LOG.info(
        "%s (%s, %s) of %s: %d sequences, %d tokens in %.1f s (%.0f tokens/s)%s -> %s",
        "Gram matrices" if gram else f"{config.granularity} Fisher",
        "forward only" if gram else config.mode,
        str(run.dtype).removeprefix("torch."),
        run.ref,
        counts["counted"],
        counts["tokens"],
        seconds,
        rate,
        f", {counts['skipped']} skipped as non-finite" if counts["skipped"] else "",
        out,
    )
    return store


def _estimator_metadata(
    run: _Run,
    config: EstimateConfig,
    ctx: distributed.DistContext,
    counts: dict[str, int],
    draws: int,
) -> dict[str, Any]:
    """The store's record of how it was estimated."""
    from mergekit_fisher import __version__

    estimator: dict[str, Any] = {
        "statistic": config.statistic,
        "mode": config.mode,
        "granularity": config.granularity,
        "num_sequences": counts["counted"],
        "num_tokens": counts["tokens"],
        "max_length": config.max_length,
        "seed": config.seed,
        "samples_per_example": draws,
        "data_fingerprint": run.calib.fingerprint,
        "data_contents": list(run.calib.contents),
        "data_sources": list(run.calib.sources),
        "dtype": str(run.dtype).removeprefix("torch."),
        "skipped_nonfinite": counts["skipped"],
        "pack": config.pack,
        "world_size": ctx.world_size,
        "mergekit_fisher_version": __version__,
    }
    if run.collector.plans:
        estimator["memory_plan"] = {p.device: p.to_json() for p in run.collector.plans}
    if config.granularity == "nodes":
        estimator["node_mapping"] = config.node_mapping
        estimator["kv_heads"] = config.kv_heads
    if isinstance(run.collector, GramCollector):
        for key in ("mode", "granularity", "samples_per_example"):
            estimator.pop(key)
    return estimator


def _progress_bar(
    config: EstimateConfig, ctx: distributed.DistContext, total: int, initial: int
) -> Any:
    if not config.progress or not ctx.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total * ctx.world_size,
        initial=initial * ctx.world_size,
        unit="tok",
        unit_scale=True,
        desc="fisher",
        dynamic_ncols=True,
        leave=False,
    )
