"""Mask-node collector (arXiv 2403.09891 for decoder LLMs): Fisher of head and neuron masks.

Masks, fixed at 1, multiply the input of each attention output projection (one per query head,
viewed [B, T, heads, head_dim]) and the input of each MLP down projection (one per neuron). A
mask's per-example gradient is sum_t sum_d dX[b,t,h,d] * X[b,t,h,d] with X that input and dX
its gradient, so a tap on the input gives it exactly; no parameter needs a gradient and no
weight-sized tensor is ever formed. Same definition (modes, draws, masking) as the full Fisher.

Grouped-query attention: a key/value head g serves the query heads G_g. Scaling v_g by m_g
scales exactly the outputs of the heads in G_g, so d/dm_g = sum_{h in G_g} d/dm_h per example:
``kv_heads="group"`` (default) stores the Fisher of that kv mask, mean_n (sum_h g_{n,h})^2,
computed per example before squaring; ``kv_heads="sum"`` stores sum_h F_h instead.

Mapping onto weights (broadcastable tensors under the weights' own names):

* ``heads`` (default): q rows of head h and o_proj columns of head h get F_h; k/v rows of kv
  head g get its kv value; gate/up rows and the down_proj column of neuron i get F_i.
* ``paper`` (the BERT code of the paper): q/k per head as above, v and o_proj one layer mean
  of F_h ([1, 1]); FFN as above.

Embeddings, norms and lm_head are not covered: the store says ``uncovered: average``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergekit_fisher.estimate.config import EstimateError
from mergekit_fisher.estimate.full import _bind, accumulator_dtype
from mergekit_fisher.estimate.taps import BatchState, tap

SUPPORTED = "Llama, Mistral, Qwen2/Qwen3, Gemma 2/3"
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class NodeLayer:
    """One decoder layer's mask sites and the projections their values cover."""

    prefix: str
    attn: dict[str, nn.Linear]
    mlp: dict[str, nn.Linear]
    heads: int
    kv_heads: int
    head_dim: int
    neurons: int


def _num_heads(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise EstimateError(
            f"{type(model).__name__}: config has no num_attention_heads; cannot place head masks"
        )
    return int(heads)


def find_layers(model: nn.Module) -> list[NodeLayer]:
    """The decoder layers of ``model`` with their q/k/v/o and gate/up/down projections.

    Found by module structure (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``),
    so any architecture with that layout works; anything else gets an error naming the module.
    """
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if not lists:
        raise EstimateError(
            f"{type(model).__name__}: no list of decoder layers found; --granularity nodes "
            f"supports {SUPPORTED} layouts; use --granularity full"
        )
    name, layers = max(lists, key=lambda item: len(item[1]))
    heads = _num_heads(model)
    found = []
    for i, layer in enumerate(layers):
        prefix = f"{name}.{i}" if name else str(i)
        attn_mod = getattr(layer, "self_attn", None)
        mlp_mod = getattr(layer, "mlp", None)
        attn = {k: getattr(attn_mod, k, None) for k in _ATTN}
        mlp = {k: getattr(mlp_mod, k, None) for k in _MLP}
        missing = [f"self_attn.{k}" for k, m in attn.items() if not isinstance(m, nn.Linear)] + [
            f"mlp.{k}" for k, m in mlp.items() if not isinstance(m, nn.Linear)
        ]
        if missing:
            raise EstimateError(
                f"cannot map mask nodes onto module {prefix!r} ({type(layer).__name__}): it has "
                f"no {', '.join(missing[:3])}; --granularity nodes supports {SUPPORTED} "
                "layouts (use --granularity full for this model)"
            )
        o_in = attn["o_proj"].in_features  # type: ignore[union-attr]
        if o_in % heads:
            raise EstimateError(
                f"cannot map head masks onto {prefix}.self_attn.o_proj: its {o_in} inputs do not "
                f"split into {heads} heads; use --granularity full"
            )
        head_dim = o_in // heads
        kv_out = attn["k_proj"].out_features  # type: ignore[union-attr]
        kv = kv_out // head_dim
        if kv * head_dim != kv_out or heads % kv or attn["q_proj"].out_features != o_in:  # type: ignore[union-attr]
            raise EstimateError(
                f"cannot map head masks onto {prefix}.self_attn: q/k/v shapes do not fit "
                f"{heads} heads of size {head_dim}; use --granularity full"
            )
        found.append(
            NodeLayer(
                prefix=prefix,
                attn=attn,  # type: ignore[arg-type]
                mlp=mlp,  # type: ignore[arg-type]
                heads=heads,
                kv_heads=kv,
                head_dim=head_dim,
                neurons=mlp["down_proj"].in_features,  # type: ignore[union-attr]
            )
        )
    return found


class NodeCollector:
    """Taps the inputs of o_proj (heads) and down_proj (neurons); owns per-node accumulators."""

    granularity = "nodes"

    def __init__(
        self,
        model: nn.Module,
        state: BatchState,
        *,
        mapping: str = "heads",
        kv_heads: str = "group",
    ):
        self.model = model
        self.state = state
        self.mapping = mapping
        self.kv_reduce = kv_heads
        self.layers = find_layers(model)
        self.names = {id(p): n for n, p in model.named_parameters()}
        dtype = accumulator_dtype(next(model.parameters()).dtype)
        self.accumulators: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            dev = layer.attn["o_proj"].weight.device
            self.accumulators[f"{layer.prefix}.heads"] = torch.zeros(
                layer.heads, dtype=dtype, device=dev
            )
            self.accumulators[f"{layer.prefix}.kv"] = torch.zeros(
                layer.kv_heads, dtype=dtype, device=dev
            )
            dev = layer.mlp["down_proj"].weight.device
            self.accumulators[f"{layer.prefix}.neurons"] = torch.zeros(
                layer.neurons, dtype=dtype, device=dev
            )
        self._handles: list[Any] = []

    def install(self) -> None:
        for layer in self.layers:
            self._handles.append(
                layer.attn["o_proj"].register_forward_pre_hook(
                    _bind(self._pre_hook, (layer, "heads"))
                )
            )
            self._handles.append(
                layer.mlp["down_proj"].register_forward_pre_hook(
                    _bind(self._pre_hook, (layer, "neurons"))
                )
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, site: tuple[NodeLayer, str], module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (tap(x, self.state, _bind(self._backward, site), x), *args[1:])

    def _backward(self, site: tuple[NodeLayer, str], dx: torch.Tensor, x: torch.Tensor) -> None:
        layer, kind = site
        b = dx.shape[0]
        dx, x = self.state.screen(dx, x)
        acc = self.accumulators[f"{layer.prefix}.{kind}"]
        s = (dx.to(acc.dtype) * x.to(acc.dtype)).reshape(b, -1, dx.shape[-1]).sum(1)  # [B, width]
        s = s.to(acc.device)
        if kind == "neurons":
            acc.add_(s.square().sum(0))
            return
        per_head = s.view(b, layer.heads, layer.head_dim).sum(2)
        acc.add_(per_head.square().sum(0))
        per_kv = per_head.view(b, layer.kv_heads, layer.heads // layer.kv_heads).sum(2)
        self.accumulators[f"{layer.prefix}.kv"].add_(per_kv.square().sum(0))

    # ----------------------------------------------------------------- results
    def node_values(self, count: float) -> dict[str, torch.Tensor]:
        """Per-node Fisher values (``<layer>.heads|kv|neurons``), divided by the count."""
        return {name: acc / count for name, acc in self.accumulators.items()}

    def fisher(self, count: float) -> dict[str, torch.Tensor]:
        """Broadcastable Fisher tensors under the covered weights' names."""
        values = self.node_values(count)
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            out.update(
                map_layer(
                    layer,
                    values[f"{layer.prefix}.heads"],
                    values[f"{layer.prefix}.kv"],
                    values[f"{layer.prefix}.neurons"],
                    self.names,
                    mapping=self.mapping,
                    kv_heads=self.kv_reduce,
                )
            )
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {name: params[name] for name in self.fisher(1.0)}


def map_layer(
    layer: NodeLayer,
    heads: torch.Tensor,
    kv: torch.Tensor,
    neurons: torch.Tensor,
    names: dict[int, str],
    *,
    mapping: str = "heads",
    kv_heads: str = "group",
) -> dict[str, torch.Tensor]:
    """Broadcast one layer's node values onto its projections' weights (and biases)."""
    d = layer.head_dim
    heads, kv, neurons = heads.float(), kv.float(), neurons.float()
    kv_values = kv if kv_heads == "group" else heads.view(layer.kv_heads, -1).sum(1)
    rows_q = heads.repeat_interleave(d)
    rows_kv = kv_values.repeat_interleave(d)
    layer_mean = heads.mean().reshape(1)
    rows = {
        "q_proj": rows_q,
        "k_proj": rows_kv,
        "v_proj": rows_kv if mapping == "heads" else layer_mean,
    }
    out: dict[str, torch.Tensor] = {}
    for proj, values in rows.items():
        module = layer.attn[proj]
        out[names[id(module.weight)]] = values[:, None]
        if module.bias is not None:
            out[names[id(module.bias)]] = values
    o = layer.attn["o_proj"]
    out[names[id(o.weight)]] = rows_q[None, :] if mapping == "heads" else layer_mean[None, :]
    for proj in ("gate_proj", "up_proj"):
        module = layer.mlp[proj]
        out[names[id(module.weight)]] = neurons[:, None]
        if module.bias is not None:
            out[names[id(module.bias)]] = neurons
    out[names[id(layer.mlp["down_proj"].weight)]] = neurons[None, :]
    return out
