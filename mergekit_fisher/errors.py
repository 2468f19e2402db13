"""The one error family users see: a one-line message that names the file, model or tensor and
the fix. The CLI prints these without a traceback; anything else is a bug and keeps its trace."""

from __future__ import annotations


class FisherError(ValueError):
    """Base of every user-facing mergekit-fisher error."""


def user_error(error: BaseException) -> FisherError | None:
    """``error`` if it is ours, else the error of ours it wraps (e.g. inside mergekit's
    executor), else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, FisherError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
