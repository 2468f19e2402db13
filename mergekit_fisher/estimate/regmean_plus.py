"""RegMean++ (arXiv 2508.03121) for causal LMs: Gram stores measured through the merged model.

RegMean merges each linear weight from the Grams of its inputs on each model's data, each model
run alone. RegMean++ feeds block l of model m the hidden states that the *merged* embedding and
the *merged* blocks < l make of model m's data, so the Grams describe the inputs the merged
model will see. Layer by layer, for every input m of a ``regmean`` recipe:

1. model m's own block l runs on its hidden states H_m and a ``GramCollector`` adds the Grams
   of its linear layers' inputs (hooks, token selection and precision of ``estimate
   --statistic gram``: with merged == expert inputs this reproduces it);
2. block l is merged as the ``regmean`` method merges it (``tensor_merge``: the closed form for
   the linears these Grams cover, the recipe-weighted average for the rest);
3. the merged block maps every H_m to the input of block l + 1.

Last, each model's own output head (final norm, untied ``lm_head``) gets its Gram from H_m
after all merged blocks. The result is one ordinary Gram store per input, which records the
recipe (models, weights, alpha) it is valid for, and a copy of the recipe whose ``gram:``
parameters point to them: merging that recipe with plain ``mergekit-yaml`` IS RegMean++.

Memory: the embedding and head of one model, one block per model, every H_m in CPU memory in
the model dtype (moved to the device a batch at a time), and the Grams (as ``estimate``).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_fisher.data import CalibrationData
from mergekit_fisher.estimate import distributed
from mergekit_fisher.estimate.blocks import Checkpoint, Skeleton
from mergekit_fisher.estimate.config import EstimateConfig, EstimateError, parse_dtype
from mergekit_fisher.estimate.engine import Batch, collate
from mergekit_fisher.estimate.gram import ACCUMULATED_TOKENS, GramCollector
from mergekit_fisher.estimate.runner import (
    load_calibration,
    load_dtype,
    longest_first,
    resolve_device,
)
from mergekit_fisher.estimate.taps import BatchState
from mergekit_fisher.tensor_merge import RegMeanSolver, factor_grams, weighted_mean

LOG = logging.getLogger(__name__)

RECIPE_NAME = "recipe.yml"
MODEL_PARAMETERS = ("weight", "gram")
TOP_PARAMETERS = ("weight", "gram", "alpha")
DEFAULT_ALPHA = 0.9  # methods/regmean.py's default


@dataclass(frozen=True)
class PlusRecipe:
    """What RegMean++ reads from a ``regmean`` recipe: every merge input (a ``base_model`` not
    listed under ``models:`` last, as mergekit adds it), its weight, and alpha."""

    source: Mapping[str, Any]
    models: tuple[str, ...]
    weights: tuple[float, ...]
    alpha: float


@dataclass(frozen=True)
class PlusResult:
    stores: tuple[Path, ...]
    recipe: Path


def _number(value: Any, where: str, low: float, high: float = float("inf")) -> float:
    """A plain number in [low, high]: RegMean++ merges with one value, not a gradient or filter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        span = f">= {low:g}" if high == float("inf") else f"in [{low:g}, {high:g}]"
        raise EstimateError(f"{where} is {value!r}: regmean-plus needs one number {span}")
    return float(value)


def _known(params: Any, allowed: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise EstimateError(f"parameters of {where} must be a mapping, not {params!r}")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise EstimateError(f"unknown parameter(s) {unknown} in {where}: use {list(allowed)}")
    return params


def read_recipe(recipe: Any) -> PlusRecipe:
    """Check a ``regmean`` recipe (``models:`` form) and take what RegMean++ needs from it."""
    if not isinstance(recipe, Mapping) or not isinstance(recipe.get("models"), list):
        raise EstimateError("the recipe must be a mapping with a `models:` list (no slices:)")
    if recipe.get("merge_method", "regmean") != "regmean":
        raise EstimateError(
            f"merge_method {recipe['merge_method']!r}: regmean-plus makes Gram stores for "
            "merge_method: regmean recipes"
        )
    if "slices" in recipe or "modules" in recipe:
        raise EstimateError("regmean-plus needs a recipe with `models:`, not slices:/modules:")
    top = _known(recipe.get("parameters"), TOP_PARAMETERS, "the top-level parameters")
    default = _number(top.get("weight", 1.0), "the top-level weight", 0.0)
    models, weights = [], []
    for i, entry in enumerate(recipe["models"]):
        model = entry.get("model") if isinstance(entry, Mapping) else None
        if not isinstance(model, str) or not model:
            raise EstimateError(f"models[{i}] needs `model: <path or Hub id>`, not {entry!r}")
        params = _known(entry.get("parameters"), MODEL_PARAMETERS, f"model {model}")
        models.append(model)
        weights.append(_number(params.get("weight", default), f"the weight of {model}", 0.0))
    base = recipe.get("base_model")
    if base is not None and base not in models:  # mergekit adds it as one more input
        models.append(str(base))
        weights.append(default)
    if len(set(models)) < len(models) or not models or sum(weights) <= 0:
        raise EstimateError("the recipe needs distinct models whose weights sum to more than 0")
    alpha = _number(top.get("alpha", DEFAULT_ALPHA), "alpha", 0.0, 1.0)
    return PlusRecipe(recipe, tuple(models), tuple(weights), alpha)


def assign_data(plus: PlusRecipe, specs: Sequence[str]) -> list[tuple[str, ...]]:
    """Each input's calibration sources, from ``MODEL_OR_INDEX=SOURCE`` specs (the model as the
    recipe spells it, or its 0-based position among the inputs; repeatable)."""
    sources: list[list[str]] = [[] for _ in plus.models]
    for spec in specs:
        key, sep, source = spec.partition("=")
        if not (sep and key and source):
            raise EstimateError(f"--data {spec!r}: write MODEL_OR_INDEX=FILE (e.g. 0=math.jsonl)")
        sources[_input_index(plus, key)].append(source)
    missing = [m for m, s in zip(plus.models, sources) if not s]
    if missing:
        raise EstimateError(
            f"no --data for {', '.join(missing)}: RegMean++ runs every input of the recipe on "
            "its own calibration data; add --data MODEL=FILE for each"
        )
    return [tuple(s) for s in sources]


def _input_index(plus: PlusRecipe, key: str) -> int:
    if key.isdigit() and int(key) < len(plus.models):
        return int(key)
    local = _resolved(key)
    same = [i for i, m in enumerate(plus.models) if m == key or (local and _resolved(m) == local)]
    if not same:
        listed = ", ".join(f"{i}={m}" for i, m in enumerate(plus.models))
        raise EstimateError(f"--data {key}=...: {key!r} is not an input of the recipe ({listed})")
    return same[0]


def _resolved(ref: str) -> Path | None:
    path = Path(ref).expanduser()
    return path.resolve() if path.exists() else None


# --------------------------------------------------------------------------- the run


@dataclass
class _Input:
    """One merge input: its weights, data and hidden states, and the Grams gathered so far."""

    ref: str
    weight: float
    checkpoint: Checkpoint
    calib: CalibrationData
    batches: list[Batch]
    hidden: list[torch.Tensor] = field(default_factory=list)
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    consumers: dict[str, str] = field(default_factory=dict)

    def add(self, grams: _Gathered, prefix: str) -> None:
        """Keep (in CPU memory) Grams gathered in a part of the model at ``prefix``."""
        for key, gram in grams.means.items():
            self.grams[prefix + key] = gram.cpu()
        for weight, key in grams.consumers.items():
            self.consumers[prefix + weight] = prefix + key


@dataclass(frozen=True)
class _Gathered:
    """A collector's Gram means by input key, and the input key of each linear weight."""

    means: dict[str, torch.Tensor]
    consumers: dict[str, str]

    @classmethod
    def of(cls, collector: GramCollector) -> _Gathered:
        return cls(collector.fisher(0), dict(collector.consumers))


def regmean_plus(
    recipe: Any,
    data: Sequence[Sequence[str]],
    out: str | Path,
    config: EstimateConfig | None = None,
) -> PlusResult:
    """Compute the RegMean++ Gram stores of ``recipe`` (see the module docstring) from one
    list of calibration sources per input (``assign_data``) and write them, with the recipe
    that merges with them, to ``out``. ``config``: data, batch, device and dtype settings."""
    from mergekit_fisher.store import check_out_dir

    config = (config or EstimateConfig()).with_(statistic="gram")
    plus = read_recipe(recipe)
    if len(data) != len(plus.models):
        raise EstimateError(f"{len(data)} data lists for {len(plus.models)} recipe inputs")
    out = Path(out)
    check_out_dir(out, overwrite=config.overwrite)
    began = time.perf_counter()
    device = resolve_device(config, distributed.DistContext())
    skeleton = Skeleton.build(
        _model_config(plus.models, config),
        device,
        load_dtype(config, device),
        config.trust_remote_code,
    )
    inputs = [
        _open_input(ref, w, sources, config, device)
        for ref, w, sources in zip(plus.models, plus.weights, data)
    ]
    skeleton.load_outer(_merged_outer(skeleton, inputs))
    for i in inputs:
        i.hidden = [
            skeleton.catch(0, b.input_ids, b.attention_mask).hidden.cpu() for b in i.batches
        ]
    for index in _progress(skeleton.num_layers, config):
        _merge_layer(skeleton, index, inputs, plus.alpha)
    for i in inputs:
        _head_grams(skeleton, i)
    result = _write(out, plus, inputs, config, skeleton.dtype)
    LOG.info(
        "RegMean++ Grams of %d models, %d layers in %.1f s -> %s",
        len(inputs),
        skeleton.num_layers,
        time.perf_counter() - began,
        out,
    )
    return result


def _model_config(models: Sequence[str], config: EstimateConfig) -> Any:
    """The first input's transformers config; refuses inputs of another architecture."""
    from transformers import AutoConfig

    shape_keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size")
    first: Any = None
    for ref in models:
        try:
            loaded = AutoConfig.from_pretrained(ref, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as error:
            line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise EstimateError(f"cannot load the config of model {ref!r} ({line[:200]})") from None
        first = first or loaded
        differs = [k for k in shape_keys if getattr(loaded, k, None) != getattr(first, k, None)]
        if differs:
            raise EstimateError(
                f"model {ref} differs from {models[0]} in {differs[0]}: RegMean++ merges models "
                "of one architecture"
            )
    return first


def _open_input(
    ref: str, weight: float, sources: Sequence[str], config: EstimateConfig, device: torch.device
) -> _Input:
    calib = load_calibration(list(sources), ref, None, config)
    order = longest_first(calib.examples)
    batches = [
        collate([calib.examples[i] for i in chosen], chosen, device)
        for chosen in (
            order[s : s + config.batch_size] for s in range(0, len(order), config.batch_size)
        )
    ]
    return _Input(ref, weight, Checkpoint(ref), calib, batches)


def _merged_outer(skeleton: Skeleton, inputs: Sequence[_Input]) -> dict[str, torch.Tensor]:
    """The weighted average of each tensor outside the layers (one tensor per input at a
    time). Only the embedding matters: the output head never runs on merged weights."""
    weights = [i.weight for i in inputs]
    merged = {}
    for name in skeleton.outer_names:
        tensors = [i.checkpoint.tensors([name])[name] for i in inputs]
        merged[name] = weighted_mean(tensors, weights)
    return merged


def _progress(layers: int, config: EstimateConfig) -> Iterator[int]:
    from tqdm.auto import tqdm

    yield from tqdm(range(layers), desc="regmean-plus", unit="layer", disable=not config.progress)


def _merge_layer(skeleton: Skeleton, index: int, inputs: Sequence[_Input], alpha: float) -> None:
    """Gram of every input's own block ``index``, the merged block, the next hidden states."""
    blocks = [
        skeleton.block(index, i.checkpoint.tensors(skeleton.layer_names(index))) for i in inputs
    ]
    grams = [_block_grams(skeleton, index, b, i) for b, i in zip(blocks, inputs)]
    prefix = f"{skeleton.path}.{index}."
    for i, gathered in zip(inputs, grams):
        i.add(gathered, prefix)
    tensors = _merged_block(blocks, grams, [i.weight for i in inputs], alpha, prefix)
    del blocks, grams
    merged = skeleton.block(index, {prefix + n: t for n, t in tensors.items()})
    for i in inputs:
        for k, batch in enumerate(i.batches):
            call = skeleton.catch(index, batch.input_ids, batch.attention_mask)
            i.hidden[k] = skeleton.run(merged, call, i.hidden[k].to(skeleton.device)).cpu()


def _block_grams(skeleton: Skeleton, index: int, block: nn.Module, given: _Input) -> _Gathered:
    """The input Grams of ``block``'s linear layers over ``given``'s hidden states."""
    device = skeleton.device
    ids, mask = torch.zeros(1, 2, dtype=torch.long, device=device), torch.ones(1, 2, device=device)
    tiny = skeleton.catch(index, ids, mask)  # declares the accumulators, as estimate's does
    collector = GramCollector(block, BatchState(), partial(skeleton.run, block, tiny, tiny.hidden))
    collector.bank.allocate()
    collector.install()
    try:
        for batch, hidden in zip(given.batches, given.hidden):
            call = skeleton.catch(index, batch.input_ids, batch.attention_mask)
            forward = partial(skeleton.run, block, call, hidden.to(device))
            collector.run(forward, batch.attention_mask)
    finally:
        collector.remove()
    return _Gathered.of(collector)


def _merged_block(
    blocks: Sequence[nn.Module],
    grams: Sequence[_Gathered],
    weights: Sequence[float],
    alpha: float,
    prefix: str,
) -> dict[str, torch.Tensor]:
    """Block tensors merged as ``regmean`` merges them: the closed form for each linear weight
    a Gram covers (one solver per shared input), the weighted average for the rest."""
    params = [dict(b.named_parameters()) for b in blocks]
    consumers = grams[0].consumers
    solvers: dict[str, RegMeanSolver] = {}
    merged = {}
    for name, first in params[0].items():
        tensors = [p[name] for p in params]
        key = consumers.get(name)
        if key is None or first.ndim != 2:
            merged[name] = weighted_mean(tensors, weights)
            continue
        if key not in solvers:
            inputs = (g.means[key].to(torch.float64) for g in grams)
            solvers[key] = factor_grams(inputs, weights, alpha, prefix + name)
        merged[name] = solvers[key].merge(tensors)
    return merged


def _head_grams(skeleton: Skeleton, given: _Input) -> None:
    """The Grams of the linear layers after the decoder blocks (an untied ``lm_head``), this
    input's own, fed its hidden states after the merged blocks."""
    skeleton.load_outer(given.checkpoint.tensors(skeleton.outer_names))
    collector = GramCollector(skeleton.model, BatchState())
    if not collector.bank.specs.keys() - {ACCUMULATED_TOKENS}:
        return  # tied embeddings: no Gram outside the blocks
    collector.bank.allocate()
    collector.install()
    try:
        for batch, hidden in zip(given.batches, given.hidden):
            with skeleton.replaying(hidden.to(skeleton.device)):
                collector.forward(batch.input_ids, batch.attention_mask)
    finally:
        collector.remove()
    given.add(_Gathered.of(collector), "")


# --------------------------------------------------------------------------- writing


class _LazyWeights(Mapping[str, torch.Tensor]):
    """The weights a store binds to, read from the checkpoint one at a time when asked."""

    def __init__(self, checkpoint: Checkpoint, names: Sequence[str]):
        self._checkpoint, self._names = checkpoint, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._checkpoint.tensors([name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def store_names(models: Sequence[str]) -> list[str]:
    """``<model name>-gram`` per input, unique (a position prefix where names repeat)."""
    names = [re.sub(r"[^\w.\-]+", "_", Path(m.rstrip("/")).name) or "model" for m in models]
    return [f"{n}-gram" if names.count(n) == 1 else f"{i}-{n}-gram" for i, n in enumerate(names)]


def _write(
    out: Path,
    plus: PlusRecipe,
    inputs: Sequence[_Input],
    config: EstimateConfig,
    dtype: torch.dtype,
) -> PlusResult:
    """Every store and the recipe, into ``out`` at once (nothing there if anything fails)."""
    import yaml

    from mergekit_fisher.store import DEFAULT_SHARD_SIZE, atomic_directory, write_store

    names = store_names(plus.models)
    final = [out.resolve() / n for n in names]
    with atomic_directory(out, overwrite=config.overwrite) as tmp:
        for position, (given, name) in enumerate(zip(inputs, names)):
            write_store(
                tmp / name,
                given.grams,
                weights=_LazyWeights(given.checkpoint, sorted(given.consumers)),
                statistic="gram",
                consumers=given.consumers,
                model=given.ref,
                estimator=_metadata(plus, given, position, config, dtype),
                store_dtype=parse_dtype(config.stored_as, "--store-dtype"),
                shard_size=config.shard_size or DEFAULT_SHARD_SIZE,
            )
        text = yaml.safe_dump(plus_recipe(plus, final), sort_keys=False)
        (tmp / RECIPE_NAME).write_text(_RECIPE_HEADER + text, encoding="utf-8")
    return PlusResult(tuple(final), out.resolve() / RECIPE_NAME)


_RECIPE_HEADER = (
    "# RegMean++ (mergekit-fisher regmean-plus): the gram stores below were measured through\n"
    "# this recipe's merge; they are valid for exactly these models, weights and alpha.\n"
)


def plus_recipe(plus: PlusRecipe, stores: Sequence[Path]) -> dict[str, Any]:
    """The source recipe with each input's ``gram:`` pointing to its RegMean++ store (a base
    model that was not listed under ``models:`` is listed, with its store)."""
    recipe = copy.deepcopy(dict(plus.source))
    recipe["merge_method"] = "regmean"
    top = dict(recipe.get("parameters") or {})
    top.pop("gram", None)
    recipe["parameters"] = {**top, "alpha": plus.alpha}
    listed = recipe["models"]
    if len(listed) < len(plus.models):
        listed.append({"model": plus.models[-1]})
    for entry, store in zip(listed, stores):
        entry["parameters"] = {**(entry.get("parameters") or {}), "gram": str(store)}
    return recipe


def _metadata(
    plus: PlusRecipe, given: _Input, position: int, config: EstimateConfig, dtype: torch.dtype
) -> dict[str, Any]:
    """The store's record of how it was made and of the recipe it is valid for."""
    from mergekit_fisher import __version__

    return {
        "statistic": "gram",
        "method": "regmean_plus",
        "regmean_plus": {
            "reference": "arXiv 2508.03121",
            "models": list(plus.models),
            "weights": list(plus.weights),
            "alpha": plus.alpha,
            "input": position,
        },
        "num_sequences": len(given.calib),
        "num_tokens": sum(len(ex.input_ids) for ex in given.calib.examples),
        "max_length": config.max_length,
        "data_fingerprint": given.calib.fingerprint,
        "data_contents": list(given.calib.contents),
        "data_sources": list(given.calib.sources),
        "dtype": str(dtype).removeprefix("torch."),
        "pack": config.pack,
        "mergekit_fisher_version": __version__,
    }
