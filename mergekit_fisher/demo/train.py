"""Build the demo's tiny Llama and train it: a shared base on the task mixture, then experts.

Training is plain supervised fine-tuning on completion tokens only (the prompt is context),
AdamW with linear warm-up and cosine decay, right-padded batches (a causal model never
attends to the padding behind a sequence, so no attention mask is needed).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mergekit_fisher.demo.tasks import PAD_ID, VOCAB, Problem, Task, encode, sample_problems

__all__ = [
    "ModelSize",
    "TrainSettings",
    "batch_tensors",
    "build_model",
    "optimizer_step",
    "train",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSize:
    """Llama shape. The default is ~0.1M parameters: trains in seconds on a laptop CPU."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    max_positions: int = 32


@dataclass(frozen=True)
class TrainSettings:
    """One training phase (base or expert)."""

    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 20
    weight_decay: float = 0.0


def build_model(size: ModelSize, seed: int) -> torch.nn.Module:
    """A randomly initialized LlamaForCausalLM over the demo vocabulary (float32, untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=False,
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def batch_tensors(
    problems: Sequence[Problem], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for teacher forcing: labels are -100 except on completion tokens."""
    rows = [(encode(p.prompt), encode(p.completion, bos=False)) for p in problems]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        seq = prompt + completion
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt) : len(seq)] = torch.tensor(completion)
    return ids.to(device), labels.to(device)


def completion_loss(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over completion tokens (sum and count returned for exact averaging)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
    )


def optimizer_step(
    model: torch.nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> float:
    """One clipped (norm 1) optimizer and schedule step on ``loss``; its value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def train(
    model: torch.nn.Module,
    tasks: Sequence[Task],
    settings: TrainSettings,
    seed: int,
    label: str,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Train ``model`` in place on an even mixture of ``tasks``; returns the loss curve.

    Each batch draws its problems from the tasks' train splits with an RNG keyed by the seed
    and the phase ``label``, so phases and seeds never share a data stream.
    """
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )

    def schedule(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # Draw the whole phase's data up front, one stream per task, then interleave.
    per_task = math.ceil(settings.steps * settings.batch_size / len(tasks))
    pools = [sample_problems(t, "train", per_task, seed, stream=f"train/{label}") for t in tasks]
    mixed = [p for group in zip(*pools) for p in group]
    random.Random(f"shuffle/{label}/{seed}").shuffle(mixed)
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc=f"train {label}", leave=False, mininterval=1.0)
    for step in bar:
        chunk = mixed[step * settings.batch_size : (step + 1) * settings.batch_size]
        ids, labels = batch_tensors(chunk, device)
        losses.append(
            optimizer_step(model, completion_loss(model, ids, labels), optimizer, scheduler)
        )
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    logger.info("trained %s: %d steps, final loss %.4f", label, settings.steps, losses[-1])
    return losses
