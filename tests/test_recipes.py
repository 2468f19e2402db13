"""The example recipes under ``recipes/``: valid mergekit configurations that pass our pre-flight."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_passes_the_preflight(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pre-flight (unknown parameters, weights, a store for every input), with the
    stores' opening replaced: the recipes name placeholder models and stores."""
    from mergekit.config import MergeConfiguration

    from mergekit_fisher import preflight

    opened: list[tuple[str, str | None]] = []

    def open_model_store(model: str, ref: str | None, statistic: str) -> SimpleNamespace:
        opened.append((model, ref))
        return SimpleNamespace(path=Path(str(ref)))

    monkeypatch.setattr(preflight, "open_model_store", open_model_store)
    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    assert preflight.check_recipe(config)  # one of our methods, so every input was served
    experts = {m.model.model.path for m in config.models or []}
    assert experts <= {model for model, _ in opened}
    assert all(ref for _, ref in opened), opened  # no input without its store
    if config.merge_method in preflight.STORELESS_BASE:  # task vectors need their origin
        assert config.base_model is not None
