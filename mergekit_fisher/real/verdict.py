"""How sure one seed's result is: a paired bootstrap over the held-out problems.

One seed gives one number per merge; whether a gap of 0.03 means anything depends on how many
problems it rests on. Resampling the problems of each task (the same draw for every model, so
the comparison is paired) says in what share of resamples one merge stays ahead of another.
It covers the luck of which problems were drawn, not that of the fine-tune (a new seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def resampled(
    hits: Mapping[str, Mapping[str, Sequence[int]]],
    experts: Mapping[str, str],
    resamples: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per row, its normalized EM in each of ``resamples`` paired resamples: per task the same
    problem indices for every row, the expert's accuracy (``experts``: task -> its row) taken
    on the same draw."""
    rng = np.random.default_rng(seed)
    some = next(iter(hits.values()))
    draws = {t: rng.integers(0, len(some[t]), (resamples, len(some[t]))) for t in experts}
    acc = {
        row: {t: np.asarray(by_task[t], dtype=float)[draws[t]].mean(axis=1) for t in experts}
        for row, by_task in hits.items()
    }
    return {
        row: np.mean([a[t] / np.maximum(acc[experts[t]][t], 1e-9) for t in experts], axis=0)
        for row, a in acc.items()
    }


def how_sure(ahead: float, behind: float) -> str:
    """Words for the shares of resamples in which a merge is ahead and behind (the rest: level)."""
    for share, side in ((ahead, "ahead"), (behind, "behind")):
        if share >= 0.975:
            return f"clearly {side}"
        if share >= 0.8:
            return f"probably {side}"
    return "too close to call"


@dataclass(frozen=True)
class Comparison:
    """Merge ``a`` against ``b``: their normalized EM and the shares of resamples ``a`` is ahead
    of ``b`` and behind it."""

    a: str
    b: str
    mean_a: float
    mean_b: float
    ahead: float
    behind: float
    resamples: int

    def text(self) -> str:
        level = 1 - self.ahead - self.behind
        tied = f", level in {level:.0%}" if level >= 0.005 else ""
        return (
            f"{self.a} {self.mean_a:.3f} vs {self.b} {self.mean_b:.3f} "
            f"({self.mean_a - self.mean_b:+.3f}; ahead in {self.ahead:.0%}{tied} of "
            f"{self.resamples} paired resamples: {how_sure(self.ahead, self.behind)})"
        )

    def record(self) -> dict[str, float | str | int]:
        return {
            "a": self.a,
            "b": self.b,
            "a_normalized_em": self.mean_a,
            "b_normalized_em": self.mean_b,
            "share_ahead": self.ahead,
            "share_behind": self.behind,
            "resamples": self.resamples,
            "text": self.text(),
        }


def compare(
    a: str, b: str, norm: Mapping[str, float], samples: Mapping[str, np.ndarray]
) -> Comparison:
    """``a`` against ``b`` over the same resamples."""
    ahead = float(np.mean(samples[a] > samples[b]))
    behind = float(np.mean(samples[a] < samples[b]))
    return Comparison(a, b, norm[a], norm[b], ahead, behind, len(samples[a]))
