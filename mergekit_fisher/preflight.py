"""Recipe checks that run before mergekit writes anything.

mergekit silently ignores misspelled parameters and only meets a missing store deep inside the
merge. For ``merge_method: fisher`` recipes this module refuses unknown parameters, inputs
without a ``fisher`` store and unreadable stores up front, with one line each. The autoload hook
wraps ``mergekit.merge.run_merge`` with it, so plain ``mergekit-yaml`` gets the same checks; the
wrapper also turns our errors met mid-merge (a store bound to other weights) into one line
inside any click command, and removes the output directory such a failed merge created.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import click
from mergekit.config import MergeConfiguration

from mergekit_fisher.errors import user_error
from mergekit_fisher.methods import RECIPE_METHODS, STORELESS_BASE
from mergekit_fisher.methods.common import RecipeError, open_model_store, take_averaged_report
from mergekit_fisher.store import FisherStore

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    model: str
    store_ref: str
    store: FisherStore


def _parameter_blocks(config: MergeConfiguration) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, parameters) for every parameters: block of the recipe."""
    yield "top-level parameters", config.parameters or {}
    for model in config.models or []:
        yield f"model {model.model.model.path}", model.parameters or {}
    slices = list(config.slices or [])
    for name, module in (config.modules or {}).items():
        yield f"module {name}", module.parameters or {}
        slices.extend(module.slices or [])
    for i, slice_ in enumerate(slices):
        yield f"slice {i}", slice_.parameters or {}
        for source in slice_.sources:
            yield f"slice {i} source {source.model.model.path}", source.parameters or {}


def _fisher_refs(value: Any) -> list[str]:
    """String values of a parameter setting (plain, or a list of {filter, value})."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [ref for item in value for ref in _fisher_refs(getattr(item, "value", item))]
    return [str(value)]


def _inputs(config: MergeConfiguration, with_base: bool) -> list[tuple[str, dict[str, Any]]]:
    """Each merge input's model path and its own parameters (base_model too if ``with_base``)."""
    inputs: dict[str, dict[str, Any]] = {}
    for model in config.models or []:
        inputs[model.model.model.path] = dict(model.parameters or {})
    if with_base and config.models and config.base_model is not None:
        inputs.setdefault(config.base_model.model.path, {})
    slices = list(config.slices or [])
    for module in (config.modules or {}).values():
        slices.extend(module.slices or [])
    for slice_ in slices:
        for source in slice_.sources:
            inputs.setdefault(source.model.model.path, {}).update(source.parameters or {})
    return list(inputs.items())


def _numbers(value: Any) -> list[Any]:
    """The values of a numeric setting: plain, a gradient list, or a list of {filter, value}."""
    if value is None:
        return []
    if isinstance(value, list):
        return [n for item in value for n in _numbers(getattr(item, "value", item))]
    return [value]


def _check_weights(where: str, params: dict[str, Any]) -> None:
    """``weight`` must be a number >= 0: mergekit's own check stops with a pydantic traceback."""
    for value in _numbers(params.get("weight")):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not number >= 0:
            raise RecipeError(
                f"weight {value!r} in {where} is not a number >= 0: recipe weights are relative "
                "shares (0 leaves the model out); to subtract a model use a task-vector method"
            )


def check_base(config: MergeConfiguration) -> None:
    """A method whose contract requires a base (task vectors: ours and mergekit's) refuses a
    recipe without ``base_model:`` in one line, not mergekit's traceback from mid-plan."""
    from mergekit.merge_methods import BasePolicy, registered_methods

    methods = {m.spec.name: m for m in registered_methods()}
    method = methods.get(config.merge_method)
    contract = getattr(getattr(method, "spec", None), "contract", None)
    if config.base_model is None and getattr(contract, "base", None) == BasePolicy.REQUIRED:
        raise RecipeError(
            f"merge_method {config.merge_method} needs a base model: add `base_model: <the model "
            "the experts were fine-tuned from>` to the recipe (its task vectors are each model "
            "minus that base)"
        )


def check_recipe(config: MergeConfiguration) -> list[ServedModel]:
    """Validate a recipe (the base model for every method; for ours also parameters and every
    store, opened); the stores serving each input, [] for other methods."""
    check_base(config)
    if config.merge_method not in RECIPE_METHODS:
        return []
    accepted, key = RECIPE_METHODS[config.merge_method]
    for where, params in _parameter_blocks(config):
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise RecipeError(
                f"unknown parameter(s) {unknown} in {where}: merge_method "
                f"{config.merge_method} accepts {list(accepted)} (mergekit would silently "
                "ignore them)"
            )
        if config.merge_method not in STORELESS_BASE:  # task vectors may be subtracted
            _check_weights(where, params)
    shared = _fisher_refs((config.parameters or {}).get(key))
    served = []
    for model, params in _inputs(config, config.merge_method not in STORELESS_BASE):
        for ref in dict.fromkeys(_fisher_refs(params.get(key)) or shared or [None]):
            store = open_model_store(model, ref, key)
            served.append(ServedModel(model, str(ref), store))
            _announce(model, store.path)
    return served


_ANNOUNCED: set[tuple[str, str]] = set()
_WARNED_LOSSY: set[str] = set()


def _announce(model: str, store: Path) -> None:
    """Which store serves which model: once per pair and process (a search merges the same
    inputs many times), then at debug level."""
    key = (model, str(store))
    (LOG.debug if key in _ANNOUNCED else LOG.info)("model %s <- Fisher store %s", model, store)
    _ANNOUNCED.add(key)


def warn_lossy(served: list[ServedModel]) -> None:
    """Once per store and process: a bfloat16 Gram store makes regmean's solve inexact."""
    for item in served:
        store = item.store
        path = str(store.path)
        if store.statistic != "gram" or store.config.get("store_dtype") != "bfloat16":
            continue
        if path not in _WARNED_LOSSY:
            _WARNED_LOSSY.add(path)
            LOG.warning(
                "Gram store %s is stored in bfloat16: the regmean solve is only as exact as that "
                "(noise at alpha near 1); re-estimate it with the default --store-dtype float32",
                path,
            )


def _data_of(store: FisherStore) -> tuple[set[str], str | None]:
    """(per-source content hashes, data fingerprint) a store's estimate recorded."""
    estimator = store.config.get("estimator") or {}
    return set(estimator.get("data_contents") or ()), estimator.get("data_fingerprint")


def _same_data(a: FisherStore, b: FisherStore) -> bool:
    """Whether two stores were estimated on (partly) the same data: by content where both
    recorded it (the fingerprint includes the model's tokenizer path), else by fingerprint."""
    (contents_a, fingerprint_a), (contents_b, fingerprint_b) = _data_of(a), _data_of(b)
    if contents_a and contents_b:
        return bool(contents_a & contents_b)
    return fingerprint_a is not None and fingerprint_a == fingerprint_b


_WARNED_ANCHOR: set[tuple[str, str]] = set()


def warn_task_anchor(config: MergeConfiguration, served: list[ServedModel]) -> None:
    """Once per store pair and process: a base store estimated on an expert's own task data.

    On the experts' tasks the base has high loss, large gradients and a large Fisher, so such an
    anchor pulls every element back to the base and erases the skills the merge should keep.
    """
    base = config.base_model.model.path if config.base_model is not None else None
    anchors = [s for s in served if s.model == base and s.store.statistic == "fisher"]
    for anchor in anchors:
        for expert in (s for s in served if s.model != base):
            pair = (str(anchor.store.path), str(expert.store.path))
            if pair in _WARNED_ANCHOR or not _same_data(anchor.store, expert.store):
                continue
            _WARNED_ANCHOR.add(pair)
            LOG.warning(
                "base store %s was estimated on the calibration data of expert store %s: an "
                "anchor must describe what the merge must keep (general-domain text), not the "
                "experts' tasks, or it pulls every weight back to the base; re-estimate it on "
                "general data (docs/merging.md#anchoring-on-the-base-model-fisher-with-the-base)",
                *pair,
            )


def describe(served: ServedModel) -> str:
    """One line for the user: which store serves which model, and what it is."""
    store = served.store
    stats = store.config["statistics"]
    bound = "bound" if store.is_bound else "UNBOUND (weights cannot be checked)"
    return (
        f"{served.model} <- {store.path} ({store.granularity}, {stats['num_tensors']} tensors, "
        f"estimated on {store.model}, {bound})"
    )


def report_averaged() -> None:
    """The one warning listing tensors that were averaged because a store lacked them."""
    for reason, names in take_averaged_report().items():
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        log = LOG.info if reason.startswith("not covered") else LOG.warning
        log("%d tensor(s) merged by weighted averaging (%s): %s", len(names), reason, shown)


class OneLineError(click.ClickException):
    """Our error met inside a click command (plain ``mergekit-yaml`` included): one line, exit 1,
    worded like ``mergekit-fisher``'s own errors."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def wrap_run_merge(module: ModuleType) -> None:
    """Wrap ``module.run_merge`` (mergekit.merge) with the recipe pre-flight, once."""
    original = module.run_merge
    if getattr(original, "__mergekit_fisher__", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config: MergeConfiguration, *args: Any, **kwargs: Any) -> Any:
        out = Path(args[0] if args else kwargs["out_path"])
        created = not out.exists()
        try:
            served = check_recipe(merge_config)
            warn_lossy(served)
            warn_task_anchor(merge_config, served)
            take_averaged_report()
            try:
                return original(merge_config, *args, **kwargs)
            finally:
                report_averaged()
        except Exception as error:
            ours = user_error(error)
            if ours is None:
                raise
            if created:  # everything in it is this failed merge's
                shutil.rmtree(out, ignore_errors=True)
            if click.get_current_context(silent=True) is None or LOG.isEnabledFor(logging.DEBUG):
                raise
            raise OneLineError(str(ours)) from error

    run_merge.__mergekit_fisher__ = True  # type: ignore[attr-defined]
    module.run_merge = run_merge  # type: ignore[attr-defined]
