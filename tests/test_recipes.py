"""The example recipes under ``recipes/``: valid mergekit configurations of our methods."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_is_valid_and_names_only_accepted_parameters(path: Path) -> None:
    from mergekit.config import MergeConfiguration

    from mergekit_fisher.methods import RECIPE_METHODS, STORELESS_BASE

    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    accepted, store = RECIPE_METHODS[config.merge_method]
    blocks = [config.parameters or {}] + [m.parameters or {} for m in config.models or []]
    for params in blocks:
        assert set(params) <= set(accepted), (path.name, set(params) - set(accepted))
    experts = [m for m in config.models or [] if m.model != config.base_model]
    assert experts and all(store in (m.parameters or {}) for m in experts)
    if config.merge_method in STORELESS_BASE:
        assert config.base_model is not None
