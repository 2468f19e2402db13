"""The plugin's merge methods, one file each, and the one registry mergekit and the pre-flight read.

Adding a method: write ``methods/<name>.py`` against ``methods.common`` (a mergekit method
object and its ``PARAMETERS``), import it below and add one ``Method(...)`` line to ``REGISTRY``.
Method files never import each other or this package, so there is no import circle: whichever
module is imported first, this file runs first and registers every method when it is done.
"""

from __future__ import annotations

from typing import NamedTuple

from mergekit.merge_methods import MergeMethod, register, registered_methods

from mergekit_fisher.methods import fisher, fisher_arithmetic, fisher_ties, regmean


class Method(NamedTuple):
    """A merge method of the plugin and what the pre-flight checks of its recipes."""

    method: MergeMethod  # as built by mergekit's ``merge_method``
    parameters: tuple[str, ...]  # every recipe parameter it accepts
    store: str  # the parameter that names each input's store
    base_store: bool = True  # whether the base model needs one too (task-vector methods: no)


REGISTRY: tuple[Method, ...] = (
    Method(fisher.FISHER, fisher.PARAMETERS, store="fisher"),
    Method(regmean.REGMEAN, regmean.PARAMETERS, store="gram"),
    Method(
        fisher_arithmetic.FISHER_ARITHMETIC,
        fisher_arithmetic.PARAMETERS,
        store="fisher",
        base_store=False,
    ),
    Method(fisher_ties.FISHER_TIES, fisher_ties.PARAMETERS, store="fisher", base_store=False),
)

RECIPE_METHODS: dict[str, tuple[tuple[str, ...], str]] = {
    m.method.spec.name: (m.parameters, m.store) for m in REGISTRY
}
"""merge_method name -> (the recipe parameters it accepts, the parameter naming each store)."""
STORELESS_BASE = frozenset(m.method.spec.name for m in REGISTRY if not m.base_store)
"""Methods whose ``base_model`` is the origin of the task vectors and needs no store."""


def register_methods() -> None:
    """Register every method with mergekit, once (mergekit's ``register`` refuses duplicates)."""
    known = {m.spec.name for m in registered_methods()}
    for entry in REGISTRY:
        if entry.method.spec.name not in known:
            register(entry.method)


register_methods()
