"""A causal LM run one decoder block at a time, for any transformers architecture.

The *skeleton* is the model built from its config with every parameter on the meta device
(accelerate's ``init_empty_weights``; buffers such as rotary frequencies are real) and its
decoder layer list (the largest ``nn.ModuleList`` of blocks of one type) swapped for stand-ins;
only the tensors outside the layers are loaded. A forward of the skeleton computes what each
layer receives besides its hidden states (attention mask, rotary position embeddings, position
ids...) exactly as the model would, and the stand-in of layer l raises with those arguments
(GPTQ's "catcher", :meth:`Skeleton.catch`). Catching at layer l rather than once at layer 0
keeps models right whose layers get different masks (sliding-window layers of Qwen2, Gemma).
A block is a copy of the skeleton's meta layer loaded with one checkpoint's tensors
(:meth:`Skeleton.block`): only blocks a caller builds take memory.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mergekit_fisher.estimate.config import EstimateError
from mergekit_fisher.store import to_device


class _Caught(Exception):
    """Raised by the stand-in of the layer being caught, carrying its call's arguments."""

    def __init__(self, call: LayerCall):
        super().__init__("decoder layer input caught")
        self.call = call


@dataclass
class LayerCall:
    """What one decoder layer receives for one batch: hidden states and everything else."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_by_keyword: bool = False

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        """``block`` called as the model calls its layer, on ``hidden`` instead."""
        if self.hidden_by_keyword:
            return block(*self.args, hidden_states=hidden, **self.kwargs)
        return block(hidden, *self.args, **self.kwargs)


@dataclass
class _Control:
    """Shared by the stand-ins: which layer to catch, hidden states to replay at layer 0, and
    whether blocks return tuples (the stand-ins that pass their input on must do the same)."""

    catch: int | None = None
    replay: torch.Tensor | None = None
    tuple_output: bool = False


class _Stand(nn.Module):
    """Stands in for decoder layer ``index``: raises its call when caught, else passes its
    input on (layer 0 replaces it by the replayed hidden states, if any)."""

    def __init__(self, index: int, control: _Control, attributes: Mapping[str, Any]):
        super().__init__()
        for key, value in attributes.items():  # e.g. attention_type, read by some models
            setattr(self, key, value)
        self._index = index
        self._control = control

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        by_keyword = not args
        hidden, rest = (kwargs.pop("hidden_states"), args) if by_keyword else (args[0], args[1:])
        control = self._control
        if control.catch == self._index:
            raise _Caught(LayerCall(hidden, rest, kwargs, by_keyword))
        if self._index == 0 and control.replay is not None:
            hidden = control.replay
        return (hidden,) if control.tuple_output else hidden


def _plain_attributes(layer: nn.Module) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(layer).items()
        if not key.startswith("_") and key != "training" and isinstance(value, (str, int, float))
    }


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list: the longest ``nn.ModuleList`` whose entries share one type."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise EstimateError(
            f"{type(model).__name__} has no list of decoder layers (an nn.ModuleList of blocks): "
            "regmean-plus supports transformers decoder models"
        )
    return best


@dataclass
class Skeleton:
    """A model without its decoder layers' weights; see the module docstring."""

    model: nn.Module
    path: str
    templates: list[nn.Module]
    device: torch.device
    dtype: torch.dtype
    control: _Control = field(default_factory=_Control)

    @classmethod
    def build(
        cls, config: Any, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
    ) -> Skeleton:
        """The skeleton of ``config``'s causal LM; load its outer tensors before use."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        model.tie_weights()  # from_config leaves a tied head untied until weights are loaded
        model.eval().requires_grad_(False)
        path, layers = find_layers(model)
        skeleton = cls(model, path, list(layers), device, dtype)
        stands = [_Stand(i, skeleton.control, _plain_attributes(m)) for i, m in enumerate(layers)]
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, nn.ModuleList(stands))
        return skeleton

    @property
    def num_layers(self) -> int:
        return len(self.templates)

    @property
    def outer_names(self) -> list[str]:
        """The weights outside the decoder layers (embeddings, final norm, an untied output
        head); buffers are computed, not loaded."""
        return [n for n, _ in self.model.named_parameters()]

    def layer_names(self, index: int) -> list[str]:
        """The checkpoint names of decoder layer ``index``'s weights."""
        return [f"{self.path}.{index}.{n}" for n, _ in self.templates[index].named_parameters()]

    def load_outer(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load (replace) the tensors outside the decoder layers."""
        self.model.load_state_dict(self._cast(tensors), strict=False, assign=True)
        self.model.tie_weights()
        empty = [n for n, p in self.model.named_parameters() if p.is_meta]
        if empty:
            raise EstimateError(f"no tensor was given for {empty[0]!r} of the model")
        self.model.to(self.device)

    def block(self, index: int, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        """Decoder layer ``index`` holding ``tensors`` (by checkpoint name), on the device."""
        prefix = f"{self.path}.{index}."
        block = copy.deepcopy(self.templates[index])
        local = {n.removeprefix(prefix): t for n, t in self._cast(tensors).items()}
        try:
            block.load_state_dict(local, strict=False, assign=True)
        except RuntimeError as error:  # a shape mismatch
            first = (str(error).strip().splitlines() or ["mismatch"])[-1].strip()
            raise EstimateError(
                f"decoder layer {index}: the tensors do not fit the model's block ({first}); "
                "every model of the recipe must have the first one's architecture"
            ) from None
        empty = [n for n, p in block.named_parameters() if p.is_meta]
        if empty:
            raise EstimateError(f"no tensor was given for {prefix}{empty[0]}")
        return block.requires_grad_(False).to(self.device)

    def _cast(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: to_device(t, self.device, self.dtype) for n, t in tensors.items()}

    def catch(self, index: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LayerCall:
        """The call decoder layer ``index`` gets for this batch (its hidden states are those of
        the skeleton's embedding: right for layer 0 only)."""
        self.control.catch = index
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Caught as caught:
            return caught.call
        finally:
            self.control.catch = None
        raise EstimateError(f"{type(self.model).__name__} never called decoder layer {index}")

    def run(self, block: nn.Module, call: LayerCall, hidden: torch.Tensor) -> torch.Tensor:
        """``block``'s output hidden states for input ``hidden`` and ``call``'s other arguments."""
        with torch.no_grad():
            out = call(block, hidden)
        self.control.tuple_output = isinstance(out, tuple)
        return out[0] if isinstance(out, tuple) else out

    @contextlib.contextmanager
    def replaying(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block, a forward of the skeleton feeds ``hidden`` to what follows the
        decoder layers (final norm, output head) instead of the embedding's output."""
        self.control.replay = hidden
        try:
            yield
        finally:
            self.control.replay = None


class Checkpoint:
    """One model's tensors, read by name a few at a time through mergekit's lazy loader
    (safetensors or PyTorch shards; a local directory or a Hub id): the tensors mergekit merges."""

    def __init__(self, ref: str):
        from mergekit.common import ModelReference

        self.ref = ref
        try:
            self._loader = ModelReference.parse(ref).lazy_loader(lazy_unpickle=True)
        except Exception as error:  # huggingface_hub, OSError, pydantic: all mean "unreadable"
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise EstimateError(
                f"cannot read the weights of {ref!r} ({first[:200]}): pass a local model "
                "directory or a Hub id (online, or already in the Hugging Face cache)"
            ) from None

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors as stored (CPU, checkpoint dtype)."""
        names = list(names)
        missing = [n for n in names if n not in self._loader.index.tensor_paths]
        if missing:
            raise EstimateError(
                f"{self.ref} has no tensor {missing[0]!r}: regmean-plus needs checkpoints whose "
                "tensor names are the transformers modules' (dense decoder models)"
            )
        return {n: self._loader.get_tensor(n) for n in names}
