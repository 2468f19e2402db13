"""Fisher-weighted model merging for mergekit.

Kept import-light on purpose: the autoload ``.pth`` imports ``mergekit_fisher._hook`` at every
interpreter start, which runs this file first, so nothing here may import torch or mergekit.
Heavy names are resolved on first attribute access.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "FisherStore": "mergekit_fisher.store",
    "StoreError": "mergekit_fisher.store",
    "open_store": "mergekit_fisher.store",
    "write_store": "mergekit_fisher.store",
    "estimate_fisher": "mergekit_fisher.estimate",
    "EstimateConfig": "mergekit_fisher.estimate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergekit_fisher' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
