"""Full-granularity collector: the exact per-example squared gradient of every parameter.

Per example b (sequence), with X the module input and dY its output gradient (both [T, .]):

* ``nn.Linear``: grad W_b = dY_b^T X_b (one ``bmm`` over the batch), grad bias_b = sum_t dY_b.
  GPT-2's ``Conv1D`` is a Linear stored transposed (weight [in, out]): grad W_b = X_b^T dY_b.
* ``nn.Embedding``: grad E_b = rows of dY_b scattered by token id (``index_add`` over the
  example's unique ids), padding positions and ``padding_idx`` excluded. An embedding whose
  ids are shared by the batch (GPT-2's position ids, [1, T]) has its output expanded to the
  batch before the tap, so its gradient arrives per example.
* Tied ``lm_head``/``embed_tokens`` (one parameter): the two contributions are summed per
  example *before* squaring, via (a + e)^2 = a^2 + 2ae + e^2 on the rows the example touches,
  with a = the lm_head part (dense) and e = the embedding part (sparse).
* Anything else with its own parameters (RMSNorm, LayerNorm, Gemma's (1 + w) norms, q/k
  norms): per-example gradients of <dY_b, module(X_b)> by ``torch.func.vmap(grad)``: exact,
  a cheap recompute of the module.

Squares are summed over the batch into a scratch block, which is then added to the
accumulator (float32; float64 for a float64 model) in one call: the accumulator may live in CPU
memory (``offload.Accumulators``) with the same result. A batch's per-example gradients live
only inside one module's backward, ``chunk_bytes`` at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mergekit_fisher.estimate.config import EstimateError
from mergekit_fisher.estimate.offload import Accumulators, Banked, Scratch
from mergekit_fisher.estimate.taps import BatchState, tap

LOG = logging.getLogger(__name__)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least; float64 stays float64 (exactness tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


CPU_BLOCK_BYTES = 2 * 1024**2
"""Per-example gradient block on CPU: small enough that a block and its accumulator rows stay
in cache (L2/L3) while every example of the batch is squared in."""


def _blocks(
    batch: int, rows: int, row_bytes: int, budget: int
) -> Iterator[tuple[slice, list[slice]]]:
    """Blocks of rows, each with its groups of examples, of at most ``budget`` bytes of
    per-example gradient: all examples of the batch at once when one row of each fits."""
    per_block = max(1, min(batch, budget // max(row_bytes, 1)))
    row_step = max(1, min(rows, budget // max(row_bytes * per_block, 1)))
    examples = [slice(e, min(e + per_block, batch)) for e in range(0, batch, per_block)]
    for r in range(0, rows, row_step):
        yield slice(r, min(r + row_step, rows)), examples


class FullCollector(Banked):
    """Installs taps on every parameterised module of ``model``; owns the accumulators."""

    granularity = "full"

    def __init__(self, model: nn.Module, state: BatchState, chunk_bytes: int = 256 * 1024**2):
        self.model = model
        self.state = state
        self.chunk_bytes = chunk_bytes
        self.names: dict[int, str] = {}
        self.params: dict[str, nn.Parameter] = {}
        for name, param in model.named_parameters():
            self.names[id(param)] = name
            self.params[name] = param
        self.bank = Accumulators()
        for name, p in self.params.items():
            self.bank.declare(name, tuple(p.shape), accumulator_dtype(p.dtype), p.device)
        self._handles: list[Any] = []
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch = Scratch()
        self._in_fallback = False
        self._plan()

    # ----------------------------------------------------------------- installation
    def _plan(self) -> None:
        """Assign every parameter to exactly one handler (tied lm_head: two, summed)."""
        owners: dict[str, list[str]] = {}
        embedding_params = set()
        self._modules: list[tuple[str, nn.Module, str]] = []
        for mname, module in self.model.named_modules():
            direct = list(module.named_parameters(recurse=False))
            if not direct:
                continue
            if isinstance(module, nn.Linear):
                kind = "linear"
            elif is_conv1d(module):
                kind = "conv1d"
            elif isinstance(module, nn.Embedding):
                kind = "embedding"
                if module.max_norm is not None:
                    raise EstimateError(
                        f"embedding {mname!r} uses max_norm: its per-example gradient is not "
                        "supported; use --granularity nodes"
                    )
                if type(module).forward is not nn.Embedding.forward and not hasattr(
                    module, "embed_scale"
                ):
                    kind = "generic"
            else:
                kind = "generic"
            for pname, param in direct:
                owners.setdefault(self.names[id(param)], []).append(f"{mname}.{pname}")
                if kind == "embedding":
                    embedding_params.add(id(param))
            self._modules.append((mname, module, kind))
        self._tied: set[str] = set()
        for name, users in owners.items():
            if len(users) == 1:
                continue
            if len(users) == 2 and id(self.params[name]) in embedding_params:
                self._tied.add(name)
                continue
            raise EstimateError(
                f"parameter {name!r} is shared by modules {users}: only a tied lm_head and "
                "input embedding are supported for per-example gradients; use --granularity nodes"
            )

    def install(self) -> None:
        for mname, module, kind in self._modules:
            hook = {
                "linear": self._linear_hook,
                "conv1d": self._conv1d_hook,
                "embedding": self._embedding_hook,
            }.get(kind, self._generic_hook)
            self._handles.append(module.register_forward_hook(_bind(hook, mname)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stash.clear()

    # ----------------------------------------------------------------- hooks
    def _linear_hook(self, mname: str, module: nn.Linear, args: tuple, output: torch.Tensor):
        if self._in_fallback:
            return None
        return tap(output, self.state, _bind(self._linear_backward, module), args[0])

    def _conv1d_hook(self, mname: str, module: nn.Module, args: tuple, output: torch.Tensor):
        if self._in_fallback:
            return None
        return tap(output, self.state, _bind(self._conv1d_backward, module), args[0])

    def _embedding_hook(self, mname: str, module: nn.Embedding, args: tuple, output: torch.Tensor):
        if self._in_fallback:
            return None
        ids, b = args[0], self.state.batch_size
        if output.shape[0] == 1 and b > 1 and torch.is_grad_enabled():  # ids shared by the batch
            output, ids = output.expand(b, *output.shape[1:]), ids.expand(b, *ids.shape[1:])
        return tap(output, self.state, _bind(self._embedding_backward, module), ids)

    def _generic_hook(self, mname: str, module: nn.Module, args: tuple, output: Any):
        if self._in_fallback:
            return None
        if (
            len(args) != 1
            or not isinstance(args[0], torch.Tensor)
            or not isinstance(output, torch.Tensor)
        ):
            raise EstimateError(
                f"module {mname!r} ({type(module).__name__}) has parameters but is not a "
                "one-tensor-in, one-tensor-out module: its per-example gradient is not supported; "
                "use --granularity nodes"
            )
        return tap(output, self.state, _bind(self._generic_backward, module), args[0])

    # ----------------------------------------------------------------- backward callbacks
    def _linear_backward(self, module: nn.Linear, dy: torch.Tensor, x: torch.Tensor) -> None:
        self._dense_backward(module, dy, x, transposed=False)

    def _conv1d_backward(self, module: nn.Module, dy: torch.Tensor, x: torch.Tensor) -> None:
        self._dense_backward(module, dy, x, transposed=True)

    def _dense_backward(
        self, module: nn.Module, dy: torch.Tensor, x: torch.Tensor, *, transposed: bool
    ) -> None:
        """Per-example weight gradients dY^T X ([out, in]; X^T dY for a transposed weight)."""
        dy, x = self.state.screen(dy, x)
        x = x.to(dy.dtype)
        wname = self.names[id(module.weight)]
        left, right = (x, dy) if transposed else (dy, x)
        self._square_into(wname, left, right)
        if module.bias is not None:
            bname = self.names[id(module.bias)]
            gb = dy.sum(1, dtype=self.bank.specs[bname].dtype)
            self.bank.add(bname, gb.square_().sum(0))
        if wname in self._tied:
            self._stash[wname] = (dy, x)

    def _square_into(
        self, name: str, left: torch.Tensor, right: torch.Tensor, at: tuple[int, ...] = ()
    ) -> None:
        """acc[at] += sum_b (left_b^T right_b)^2, one block of rows at a time.

        Each block's per-example products go into one reused scratch buffer (no allocation)
        and are squared into a second one, the block's sum over the batch, which is then added
        to the accumulator's rows (resident or offloaded alike). On CPU a block is cache-sized
        (``CPU_BLOCK_BYTES``), so products and sums stay in cache instead of streaming the
        weight's size through memory once per example.
        """
        b, rows, cols = left.shape[0], left.shape[2], right.shape[2]
        budget = self.chunk_bytes
        if right.device.type == "cpu":
            budget = min(budget, CPU_BLOCK_BYTES)
        size = min(budget, b * rows * cols * right.element_size()) // right.element_size()
        products = self._scratch.get("products", size, right.dtype, right.device)
        dtype = self.bank.specs[name].dtype
        for rs, groups in _blocks(b, rows, cols * right.element_size(), budget):
            block = (rs.stop - rs.start, cols)
            total = self._scratch.get("squares", block[0] * cols, dtype, right.device).view(block)
            total.zero_()
            for ex in groups:
                n = ex.stop - ex.start
                g = products[: n * total.numel()].view(n, *block)
                torch.bmm(left[ex, :, rs].transpose(1, 2), right[ex], out=g)
                # Square per example: no squared temporary, and a bf16 g squares exactly in
                # float32 (8-bit mantissas).
                for i in range(n):
                    total.addcmul_(g[i], g[i])
            self.bank.add(name, total, (*at, rs))

    def _embedding_backward(
        self, module: nn.Embedding, dy: torch.Tensor, ids: torch.Tensor
    ) -> None:
        (dy,) = self.state.screen(dy)
        b = dy.shape[0]
        wname = self.names[id(module.weight)]
        spec = self.bank.specs[wname]
        scale = getattr(module, "embed_scale", None)
        stash = self._stash.pop(wname, None)
        lengths = self.state.lengths
        ids = ids.reshape(b, -1)
        for i in range(b):
            n = lengths[i] if i < len(lengths) else ids.shape[1]
            tok = ids[i, :n]
            rows = dy[i, :n].to(spec.dtype)
            if scale is not None:
                rows = rows * torch.as_tensor(scale, dtype=spec.dtype, device=rows.device)
            if module.padding_idx is not None:
                keep = tok != module.padding_idx
                tok, rows = tok[keep], rows[keep]
            uniq, inverse = torch.unique(tok, return_inverse=True)
            e = torch.zeros(len(uniq), spec.shape[1], dtype=spec.dtype, device=spec.home)
            e.index_add_(0, inverse.to(spec.home), rows.to(spec.home))
            uniq = uniq.to(spec.home)
            contribution = e * e
            if stash is not None:  # tied lm_head: add 2 a e, a = lm_head's rows of this example
                sdy, sx = stash
                a = sdy[i][:, uniq.to(sdy.device)].transpose(0, 1).to(spec.dtype) @ sx[i].to(
                    spec.dtype
                )
                contribution += 2 * a.to(spec.home) * e
            self.bank.index_add(wname, uniq, contribution)

    def _generic_backward(self, module: nn.Module, dy: torch.Tensor, x: torch.Tensor) -> None:
        from torch.func import functional_call, grad, vmap

        dy, x = self.state.screen(dy, x)
        params = {k: p.detach() for k, p in module.named_parameters(recurse=False)}

        def inner(p: dict[str, torch.Tensor], xi: torch.Tensor, dyi: torch.Tensor) -> torch.Tensor:
            out = functional_call(module, p, (xi.unsqueeze(0),))
            return (out * dyi.unsqueeze(0)).sum()

        self._in_fallback = True
        try:
            with torch.enable_grad():
                grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, x, dy)
        finally:
            self._in_fallback = False
        for k, g in grads.items():
            name = self.names[id(getattr(module, k))]
            spec = self.bank.specs[name]
            self.bank.add(name, g.to(spec.dtype).square_().sum(0).to(spec.home))

    # ----------------------------------------------------------------- results
    def fisher(self, count: float) -> dict[str, torch.Tensor]:
        """The Fisher tensors by parameter name: accumulated squares / (sequences x draws)."""
        return {name: acc / count for name, acc in self.accumulators.items()}

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.params)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a Linear whose weight is stored [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _bind(fn: Any, first: Any) -> Any:
    """``functools.partial`` that keeps hook signatures readable in tracebacks."""

    def bound(*args: Any) -> Any:
        return fn(first, *args)

    return bound
