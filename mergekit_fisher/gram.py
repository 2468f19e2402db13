"""Input Gram matrices of every linear layer, for RegMean (``estimate --statistic gram``).

G = (1/N) sum over non-padding tokens of x x^T, where x is a linear layer's input and N the
number of such tokens. Layers that read the same tensor (q/k/v projections, gate/up) share one
Gram: forward hooks key each input by the identity of the tensor object within one forward
pass, so the grouping needs no architecture knowledge. Only forward passes run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GramAccumulator:
    """Sums of x x^T per distinct layer input, and which weights read each input."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    consumers: dict[str, str] = field(default_factory=dict)
    tokens: int = 0

    def grams(self) -> dict[str, torch.Tensor]:
        """Means over tokens, float32 (the store's tensors)."""
        return {k: (v / max(self.tokens, 1)).float() for k, v in self.sums.items()}


def _tied_to_embedding(model: torch.nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}


class GramHooks:
    """Forward hooks on every ``nn.Linear`` of ``model``; use as a context manager.

    A linear layer tied to an embedding (``lm_head`` with tied embeddings) is skipped: its
    weight arrives at merge time as the embedding, which is not a linear map of its inputs.
    """

    def __init__(self, model: torch.nn.Module, accumulator: GramAccumulator | None = None):
        self.model = model
        self.accumulator = accumulator or GramAccumulator()
        self._mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> GramHooks:
        tied = _tied_to_embedding(self.model)
        self._handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in self.model.named_modules()
            if isinstance(module, torch.nn.Linear) and id(module.weight) not in tied
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def record(
            module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: object
        ) -> None:
            x = inputs[0]
            seen = self._seen.get(id(x))
            if seen is None or seen[0] is not x:
                seen = self._seen[id(x)] = (x, f"{name}.input")
                rows = x.detach().reshape(-1, x.shape[-1])
                if self._mask is not None:
                    rows = rows[self._mask.reshape(-1).to(rows.device)]
                rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
                gram = (rows.T @ rows).double()
                sums = self.accumulator.sums
                sums[seen[1]] = gram if seen[1] not in sums else sums[seen[1]].add_(gram)
            self.accumulator.consumers[f"{name}.weight"] = seen[1]

        return record

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """One forward pass: adds the Grams of this batch's non-padding tokens."""
        self._mask = attention_mask.bool()
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, attention_mask=attention_mask)
            self.accumulator.tokens += int(self._mask.sum())
        finally:
            self._mask = None
            self._seen.clear()
