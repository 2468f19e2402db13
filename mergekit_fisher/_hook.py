"""Autoload: make plain ``mergekit-yaml`` see the ``fisher`` method after ``pip install``.

mergekit has no plugin discovery, so ``mergekit_fisher.pth`` imports this module at interpreter
start. It must cost nothing: it imports only ``os`` and ``sys`` and installs a one-shot
``sys.meta_path`` finder. When ``mergekit.merge_methods`` finishes importing, the finder
registers our methods; when ``mergekit.merge`` finishes, it wraps ``run_merge`` with the
recipe pre-flight (unknown parameters, missing or unreadable stores: one clear line before
anything is written). ``MERGEKIT_FISHER_AUTOLOAD=0`` switches all of it off.
"""

import os
import sys

_PENDING = {"mergekit.merge_methods", "mergekit.merge"}


class _AutoloadFinder:
    """Not an ``importlib.abc.MetaPathFinder`` subclass: importing importlib.abc costs ~40 ms."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name not in _PENDING:
            return None
        _PENDING.discard(name)
        if not _PENDING and cls in sys.meta_path:
            sys.meta_path.remove(cls)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            original(module)
            _after_import(name, module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _after_import(name: str, module: object) -> None:
    try:
        if name == "mergekit.merge_methods":
            if "mergekit_fisher.methods" in sys.modules:
                return  # it is importing mergekit right now and registers itself when done
            from mergekit_fisher.methods import register_methods

            register_methods()
        else:
            from mergekit_fisher.preflight import wrap_run_merge

            wrap_run_merge(module)
    except Exception as error:  # never break mergekit itself
        import logging

        logging.getLogger("mergekit_fisher").warning(
            "mergekit-fisher autoload failed (%s: %s); `fisher` is unavailable",
            type(error).__name__,
            error,
        )


def install() -> None:
    if os.environ.get("MERGEKIT_FISHER_AUTOLOAD", "1").strip().lower() in ("0", "false", "no"):
        return
    if _AutoloadFinder in sys.meta_path:
        return
    if "mergekit.merge_methods" in sys.modules:
        _after_import("mergekit.merge_methods", sys.modules["mergekit.merge_methods"])
        _PENDING.discard("mergekit.merge_methods")
    if "mergekit.merge" in sys.modules:
        _after_import("mergekit.merge", sys.modules["mergekit.merge"])
        _PENDING.discard("mergekit.merge")
    if _PENDING:
        sys.meta_path.insert(0, _AutoloadFinder)


install()
