"""Mixture-of-experts layers in the full Fisher: routers and fused expert weights, per example.

transformers 5 stores a sparse MoE layer's experts fused, ``experts.gate_up_proj`` [E, 2I, H]
(gate rows, then up rows) and ``experts.down_proj`` [E, H, I], under the ``named_parameters()``
names mergekit merges, and a router ``gate`` (``weight`` [E, H]) returns (logits, scores,
indices): each token goes to its top-k experts, weighted by scores from a softmax over the
logits (renormalised over the top k where the family does so). Per example b, over the rows
r = (token t, expert e, score w) routed there, with x_t the layer input and dy_t its gradient:

* ``down_proj[e]``: sum_r (w dy_t) a_r^T, a_r the expert's gated activation;
* ``gate_up_proj[e]``: sum_r dh_r x_t^T, dh_r the gradient at the gate/up outputs, by autograd
  through the experts' own ``_apply_gate`` (any activation);
* the router: its gradient reaches the weight through the scores (softmax, top-k, renormalise),
  not only the logits; a tap on the scores and ``vmap(grad)`` of the router's own forward per
  example give it exactly. The logits feed only the auxiliary load-balancing loss, which the
  log-likelihood does not contain.

Only routed tokens reach an expert: each expert's rows are packed per example [B, rows, .] and
one ``bmm`` gives every example's gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_fisher.estimate.config import EstimateError
from mergekit_fisher.estimate.full import FullCollector, _bind
from mergekit_fisher.estimate.taps import BatchState, tap

SUPPORTED = (
    "Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE (experts gate_up_proj [E, 2I, H], down_proj [E, H, I])"
)


@dataclass(frozen=True)
class MoeBlock:
    """One sparse MoE layer: its router and its fused experts."""

    prefix: str
    router: nn.Module
    experts: nn.Module


def find_moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every module with ``experts`` holding a fused 3D ``gate_up_proj`` and a ``gate`` router."""
    found = (moe_block(name, module) for name, module in model.named_modules())
    return [block for block in found if block is not None]


def moe_block(prefix: str, module: object) -> MoeBlock | None:
    """``module`` as a sparse MoE layer (layout checked), or None when it is not one."""
    experts, router = getattr(module, "experts", None), getattr(module, "gate", None)
    fused = getattr(experts, "gate_up_proj", None)
    if not (isinstance(fused, torch.Tensor) and fused.ndim == 3 and isinstance(router, nn.Module)):
        return None
    _check_layout(prefix, router, experts)  # type: ignore[arg-type]
    return MoeBlock(prefix, router, experts)  # type: ignore[arg-type]


def _check_layout(prefix: str, router: nn.Module, experts: nn.Module) -> None:
    """Refuse what the per-example math below does not describe, naming the difference."""
    odd = [
        flag
        for flag, bad in (
            ("biased", getattr(experts, "has_bias", False)),
            ("transposed", getattr(experts, "is_transposed", False)),
            ("interleaved gate/up", not getattr(experts, "is_concatenated", True)),
            ("no gate", not getattr(experts, "has_gate", True)),
            ("no _apply_gate", not hasattr(experts, "_apply_gate")),
            ("post-expert norm", getattr(experts, "has_post_expert_norm", False)),
            ("router parameters other than weight", _router_params(router) != ["weight"]),
            ("down_proj not [E, H, I]", getattr(experts.down_proj, "ndim", 0) != 3),
        )
        if bad
    ]
    if odd:
        raise EstimateError(
            f"{prefix}: {type(experts).__name__} / {type(router).__name__} ({', '.join(odd)}) is "
            f"not a supported expert layout; --granularity full supports {SUPPORTED}; "
            "use --statistic gram"
        )


def _router_params(router: nn.Module) -> list[str]:
    return [name for name, _ in router.named_parameters()]


def refuse_fused(model: nn.Module, granularity: str, hint: str, owned: set[int]) -> None:
    """Any 3D+ weight outside ``owned`` has no per-example path: one line, before any forward."""
    for name, param in model.named_parameters():
        if param.ndim >= 3 and id(param) not in owned:
            raise EstimateError(
                f"{type(model).__name__}: {name} {list(param.shape)} is a fused "
                f"mixture-of-experts weight; --granularity {granularity} does not support it; "
                f"{hint}"
            )


def eager_experts_in_float64(model: nn.Module) -> None:
    """transformers' default ``grouped_mm`` experts have no float64 kernel: a float64 MoE model
    (exactness runs) switches to the ``eager`` experts, the same math."""
    config = getattr(model, "config", None)
    fused = any(p.ndim >= 3 for p in model.parameters())
    float64 = any(p.dtype == torch.float64 for p in model.parameters())
    if fused and float64 and getattr(config, "_experts_implementation", None) == "grouped_mm":
        model.set_experts_implementation("eager")  # type: ignore[operator]


class RouterScores(nn.Module):
    """A router seen as one tensor in, its scores out, sharing its weight: FullCollector's
    per-example ``vmap(grad)`` recompute then applies to it unchanged."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = [router]  # a list, not a submodule: the weight below is the one parameter
        self.weight = router.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        return functional_call(self.router[0], {"weight": self.weight}, (x,))[1]


class MoeFullCollector(FullCollector):
    """``FullCollector`` that also owns the MoE routers and fused experts (dense models: the same)."""

    def __init__(self, model: nn.Module, state: BatchState, chunk_bytes: int = 256 * 1024**2):
        self.blocks = find_moe_blocks(model)
        owned = {id(p) for b in self.blocks for m in (b.router, b.experts) for p in m.parameters()}
        refuse_fused(model, "full", f"supported: {SUPPORTED}; or use --statistic gram", owned)
        self._scores = {id(b.router): RouterScores(b.router) for b in self.blocks}
        super().__init__(model, state, chunk_bytes)

    def _plan(self) -> None:
        super()._plan()
        mine = {id(m) for b in self.blocks for m in (b.router, b.experts)}
        self._modules = [entry for entry in self._modules if id(entry[1]) not in mine]

    def install(self) -> None:
        super().install()
        for block in self.blocks:
            self._handles.append(block.router.register_forward_hook(_bind(self._on_router, block)))
            self._handles.append(
                block.experts.register_forward_hook(_bind(self._on_experts, block))
            )

    # ----------------------------------------------------------------- hooks
    def _on_router(self, block: MoeBlock, module: nn.Module, args: tuple, output: Any) -> Any:
        if self._in_fallback:  # the router's own recompute in _generic_backward
            return None
        if not (isinstance(output, tuple) and len(output) == 3 and len(args) == 1):
            raise EstimateError(
                f"{block.prefix}.gate: the router does not take hidden states and return "
                f"(logits, scores, indices); --granularity full supports {SUPPORTED}"
            )
        logits, scores, indices = output
        callback = _bind(self._router_backward, block)
        return logits, tap(scores, self.state, callback, args[0]), indices

    def _on_experts(self, block: MoeBlock, module: nn.Module, args: tuple, output: Any) -> Any:
        return tap_experts(block, self.state, _bind(self._experts_backward, block), args, output)

    # ----------------------------------------------------------------- backward callbacks
    def _router_backward(self, block: MoeBlock, dscores: torch.Tensor, x: torch.Tensor) -> None:
        """Per example: grad of <dscores_b, scores(x_b)>, FullCollector's vmap(grad) recompute."""
        self._generic_backward(self._scores[id(block.router)], dscores, x)  # screened per example

    def _experts_backward(
        self,
        block: MoeBlock,
        dy: torch.Tensor,
        x: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """Each expert's routed rows, packed per example, into its slice of the accumulators."""
        b, t = self.state.batch_size, dy.shape[0] // self.state.batch_size
        experts = block.experts
        for e, tok, x_e, dyw in routed_rows(self.state, dy, x, index, weights):
            a, dh = _expert_local(experts, e, x_e, dyw)
            pack = _packer(tok // t, b)
            self._add_squares(experts.gate_up_proj, e, pack(dh), pack(x_e))
            self._add_squares(experts.down_proj, e, pack(dyw), pack(a))

    def _add_squares(
        self, param: torch.Tensor, e: int, left: torch.Tensor, right: torch.Tensor
    ) -> None:
        """acc[e] += sum_b (left_b^T right_b)^2, through the dense layers' blocked squaring."""
        self._square_into(self.names[id(param)], left, right.to(left.dtype), (e,))


def tap_experts(
    block: MoeBlock, state: BatchState, callback: Callable[..., None], args: tuple, output: Any
) -> torch.Tensor:
    """The experts' output, tapped: ``callback(dy, hidden, top_k_index, top_k_weights)``."""
    if len(args) != 3 or not isinstance(output, torch.Tensor):
        raise EstimateError(
            f"{block.prefix}.experts: not called as experts(hidden, top_k_index, "
            f"top_k_weights); MoE support covers {SUPPORTED}"
        )
    return tap(output, state, callback, *args)


def routed_rows(
    state: BatchState,
    dy: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per hit expert e: its token rows (flat, [B*T]), their inputs, and the output gradient
    times the routing weight, ``w dy`` (screened like every other tap)."""
    dy, x = state.screen(dy, x)
    dy, x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    for e in torch.unique(index).tolist():
        tok, slot = torch.where(index == e)
        yield e, tok, x[tok], (dy[tok] * weights[tok, slot, None]).to(dy.dtype)


def expert_activation(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s gate/up outputs on its rows (what its ``_apply_gate`` gates)."""
    return F.linear(x, experts.gate_up_proj[e].detach())


def expert_input_grad(
    experts: nn.Module, e: int, dyw: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """The gradient at expert ``e``'s down_proj input (its gated activation)."""
    return dyw.to(like.dtype) @ experts.down_proj[e].detach().to(like.dtype)


def _expert_local(
    experts: nn.Module, e: int, x: torch.Tensor, dyw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e`` on its rows: activation a, and the gradient dh at its gate/up outputs."""
    with torch.enable_grad():
        h = expert_activation(experts, e, x).requires_grad_()
        a = experts._apply_gate(h)
        (dh,) = torch.autograd.grad(a, h, expert_input_grad(experts, e, dyw, a))
    return a.detach(), dh


def _packer(example: torch.Tensor, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows sorted by example -> [batch, most rows of one example, .], zero-padded."""
    counts = torch.bincount(example, minlength=batch)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(example), device=example.device) - start[example]
    width = int(counts.max())

    def pack(rows: torch.Tensor) -> torch.Tensor:
        out = rows.new_zeros(batch, width, rows.shape[-1])
        out[example, pos] = rows
        return out

    return pack
