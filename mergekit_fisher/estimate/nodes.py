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

Fused layouts map through the fused weights' row segments: Phi-3's ``qkv_proj`` rows are q | k |
v heads and ``gate_up_proj`` rows gate | up neurons; Starcoder2's MLP is ``c_fc`` / ``c_proj``;
GPT-2's ``Conv1D`` weights are [in, out], so its values lie along the other axis.

Sparse MoE layers (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE; fused ``experts.gate_up_proj``
[E, 2I, H] and ``experts.down_proj`` [E, H, I]): one mask per expert neuron on that expert's
gated activation, so only the tokens routed to expert e contribute to its values,
sum_r a_r[i] (W_e^T w dy_t)[i] per example. They map onto ``gate_up_proj`` rows ([E, 2I, 1]:
gate and up rows of a neuron) and ``down_proj`` columns ([E, 1, I]). Qwen2-MoE's shared expert
has no masks: it is averaged.

Embeddings, norms, routers and lm_head are not covered: the store says ``uncovered: average``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergekit_fisher.estimate.config import EstimateError
from mergekit_fisher.estimate.full import _bind, accumulator_dtype, is_conv1d
from mergekit_fisher.estimate.moe import (
    MoeBlock,
    expert_activation,
    expert_input_grad,
    moe_block,
    refuse_fused,
    routed_rows,
    tap_experts,
)
from mergekit_fisher.estimate.offload import Accumulators, Banked
from mergekit_fisher.estimate.taps import BatchState, tap

SUPPORTED = (
    "Llama, Mistral, Qwen2/Qwen3, Gemma 2/3, Phi-1/2/3, Starcoder2, GPT-2, Apertus, Mixtral, "
    "Qwen3-MoE, Qwen2-MoE, OLMoE"
)
_MOE_HINT = "use --granularity full or --statistic gram"

# Known layouts: the projections whose output rows hold segments ("q", "k", "v" heads, "n"
# neurons) in order, and the module whose input is masked (heads, resp. neurons).
_ATTN_LAYOUTS: tuple[tuple[dict[str, tuple[str, ...]], str], ...] = (
    ({"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",)}, "o_proj"),
    ({"qkv_proj": ("q", "k", "v")}, "o_proj"),  # Phi-3
    ({"c_attn": ("q", "k", "v")}, "c_proj"),  # GPT-2 (Conv1D)
    ({"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",)}, "dense"),  # Phi-1/2
)
_MLP_LAYOUTS: tuple[tuple[dict[str, tuple[str, ...]], str], ...] = (
    ({"gate_proj": ("n",), "up_proj": ("n",)}, "down_proj"),
    ({"gate_up_proj": ("n", "n")}, "down_proj"),  # Phi-3: gate rows, then up rows
    ({"c_fc": ("n",)}, "c_proj"),  # Starcoder2, GPT-2
    ({"fc1": ("n",)}, "fc2"),  # Phi-1/2
    ({"up_proj": ("n",)}, "down_proj"),  # Apertus: no gate
)


@dataclass
class NodeLayer:
    """One decoder layer's mask sites and the projections their values cover."""

    prefix: str
    o: nn.Module  # its input is masked per query head
    down: nn.Module | None  # its input is masked per neuron (None: a sparse MoE layer)
    rows: list[tuple[nn.Module, tuple[str, ...]]]  # projections and their output-row segments
    heads: int
    kv_heads: int
    head_dim: int
    neurons: int  # per expert in a sparse MoE layer
    moe: MoeBlock | None = None  # each expert's down_proj input is masked per neuron

    @property
    def neuron_shape(self) -> tuple[int, ...]:
        """[I] for a dense MLP, [E, I] for a sparse MoE layer."""
        return (self.moe.experts.down_proj.shape[0], self.neurons) if self.moe else (self.neurons,)


def _dense(module: object) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and is_conv1d(module))


def _out_in(module: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) of a Linear, or of a Conv1D (weight [in, out])."""
    out, inp = module.weight.shape
    return (inp, out) if is_conv1d(module) else (out, inp)


def _match(
    parent: nn.Module | None, layouts: tuple[tuple[dict[str, tuple[str, ...]], str], ...]
) -> tuple[list[tuple[nn.Module, tuple[str, ...]]], nn.Module] | None:
    """The first layout whose projections and site all exist as dense modules of ``parent``."""
    for projections, site in layouts:
        found = [(getattr(parent, k, None), segments) for k, segments in projections.items()]
        site_module = getattr(parent, site, None)
        if all(_dense(m) for m, _ in found) and _dense(site_module):
            return found, site_module  # type: ignore[return-value]
    return None


def _num_heads(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise EstimateError(
            f"{type(model).__name__}: config has no num_attention_heads; cannot place head masks"
        )
    return int(heads)


def _layer(prefix: str, layer: nn.Module, heads: int) -> NodeLayer:
    """Match one decoder layer against the known layouts and check the head/neuron shapes."""
    attn = _match(getattr(layer, "self_attn", None) or getattr(layer, "attn", None), _ATTN_LAYOUTS)
    moe = moe_block(f"{prefix}.mlp", getattr(layer, "mlp", None))
    mlp = ([], None) if moe else _match(getattr(layer, "mlp", None), _MLP_LAYOUTS)
    if attn is None or mlp is None:
        what = "attention (q/k/v/o or fused qkv)" if attn is None else "MLP (gate/up/down or fused)"
        raise EstimateError(
            f"cannot map mask nodes onto module {prefix!r} ({type(layer).__name__}): its {what} "
            f"projections are not a known layout; --granularity nodes supports {SUPPORTED} "
            "(use --granularity full for this model)"
        )
    (attn_rows, o), (mlp_rows, down) = attn, mlp
    o_in = _out_in(o)[1]
    head_dim = o_in // heads
    attn_out = sum(_out_in(m)[0] for m, _ in attn_rows)
    kv = (attn_out - o_in) // (2 * head_dim) if head_dim else 0
    if o_in % heads or not kv or attn_out != o_in + 2 * kv * head_dim or heads % kv:
        raise EstimateError(
            f"cannot map head masks onto {prefix}: q/k/v/o shapes do not fit {heads} heads of "
            f"{o_in} inputs; use --granularity full"
        )
    if moe is not None:
        neurons = moe.experts.down_proj.shape[2]
        return NodeLayer(prefix, o, None, attn_rows, heads, kv, head_dim, neurons, moe)
    neurons = _out_in(down)[1]
    if sum(_out_in(m)[0] for m, _ in mlp_rows) != neurons * sum(len(s) for _, s in mlp_rows):
        raise EstimateError(
            f"cannot map neuron masks onto {prefix}: MLP shapes do not fit {neurons} neurons; "
            "use --granularity full"
        )
    return NodeLayer(prefix, o, down, attn_rows + mlp_rows, heads, kv, head_dim, neurons)


def find_layers(model: nn.Module) -> list[NodeLayer]:
    """The decoder layers of ``model`` with their projections and mask sites.

    Found by module structure (see the layout tables above), so any architecture with one of
    those layouts works; anything else gets an error naming the module.
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
    return [
        _layer(f"{name}.{i}" if name else str(i), layer, heads) for i, layer in enumerate(layers)
    ]


class NodeCollector(Banked):
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
        owned = {
            id(p) for layer in self.layers if layer.moe for p in layer.moe.experts.parameters()
        }
        refuse_fused(model, "nodes", _MOE_HINT, owned)
        self.names = {id(p): n for n, p in model.named_parameters()}
        dtype = accumulator_dtype(next(model.parameters()).dtype)
        self.bank = Accumulators()
        for layer in self.layers:
            dev = layer.o.weight.device
            self.bank.declare(f"{layer.prefix}.heads", (layer.heads,), dtype, dev)
            self.bank.declare(f"{layer.prefix}.kv", (layer.kv_heads,), dtype, dev)
            dev = (layer.moe.experts.down_proj if layer.moe else layer.down.weight).device
            self.bank.declare(f"{layer.prefix}.neurons", layer.neuron_shape, dtype, dev)
        self._handles: list[Any] = []

    def install(self) -> None:
        for layer in self.layers:
            self._handles.append(
                layer.o.register_forward_pre_hook(_bind(self._pre_hook, (layer, "heads")))
            )
            if layer.moe is not None:
                hook = _bind(self._on_experts, layer)
                self._handles.append(layer.moe.experts.register_forward_hook(hook))
                continue
            self._handles.append(
                layer.down.register_forward_pre_hook(_bind(self._pre_hook, (layer, "neurons")))
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, site: tuple[NodeLayer, str], module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (tap(x, self.state, _bind(self._backward, site), x), *args[1:])

    def _on_experts(self, layer: NodeLayer, module: nn.Module, args: tuple, output: Any) -> Any:
        assert layer.moe is not None
        return tap_experts(
            layer.moe, self.state, _bind(self._experts_backward, layer), args, output
        )

    def _experts_backward(
        self,
        layer: NodeLayer,
        dy: torch.Tensor,
        x: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """Per example and expert neuron: sum over the rows routed there of a * da."""
        assert layer.moe is not None
        experts, b = layer.moe.experts, self.state.batch_size
        name = f"{layer.prefix}.neurons"
        spec = self.bank.specs[name]
        t = dy.shape[0] // b
        s = torch.zeros(b, *spec.shape, dtype=spec.dtype, device=dy.device)  # [B, E, I]
        for e, tok, x_e, dyw in routed_rows(self.state, dy, x, index, weights):
            a = experts._apply_gate(expert_activation(experts, e, x_e))
            da = expert_input_grad(experts, e, dyw, a)
            s[:, e].index_add_(0, tok // t, a.to(spec.dtype) * da.to(spec.dtype))
        self.bank.add(name, s.square().sum(0).to(spec.home))

    def _backward(self, site: tuple[NodeLayer, str], dx: torch.Tensor, x: torch.Tensor) -> None:
        layer, kind = site
        dx, x = self.state.screen(dx, x)
        b = dx.shape[0]
        spec = self.bank.specs[f"{layer.prefix}.{kind}"]
        s = (dx.to(spec.dtype) * x.to(spec.dtype)).sum(1)  # [B, width]
        s = s.to(spec.home)
        if kind == "neurons":
            self.bank.add(f"{layer.prefix}.neurons", s.square().sum(0))
            return
        per_head = s.view(b, layer.heads, layer.head_dim).sum(2)
        self.bank.add(f"{layer.prefix}.heads", per_head.square().sum(0))
        per_kv = per_head.view(b, layer.kv_heads, layer.heads // layer.kv_heads).sum(2)
        self.bank.add(f"{layer.prefix}.kv", per_kv.square().sum(0))

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
    segments = {
        "q": rows_q,
        "k": rows_kv,
        "v": rows_kv if mapping == "heads" else layer_mean.expand(rows_kv.numel()),
        "n": neurons,
    }
    out: dict[str, torch.Tensor] = {}
    for module, held in layer.rows:
        values = torch.cat([segments[s] for s in held])
        if mapping == "paper" and held == ("v",):
            values = layer_mean  # one value for the whole separate v_proj
        _put(out, module, values, names, along_outputs=True)
    _put(out, layer.o, rows_q if mapping == "heads" else layer_mean, names, along_outputs=False)
    if layer.moe is not None:
        experts = layer.moe.experts
        out[names[id(experts.gate_up_proj)]] = torch.cat([neurons, neurons], 1)[:, :, None]
        out[names[id(experts.down_proj)]] = neurons[:, None, :]
    else:
        _put(out, layer.down, neurons, names, along_outputs=False)
    return out


def _put(
    out: dict[str, torch.Tensor],
    module: nn.Module,
    values: torch.Tensor,
    names: dict[int, str],
    *,
    along_outputs: bool,
) -> None:
    """``values`` on the weight's outputs (and bias) or inputs, in the weight's orientation
    (Linear [out, in], Conv1D [in, out])."""
    as_rows = along_outputs != is_conv1d(module)
    out[names[id(module.weight)]] = values[:, None] if as_rows else values[None, :]
    if along_outputs and getattr(module, "bias", None) is not None:
        out[names[id(module.bias)]] = values
