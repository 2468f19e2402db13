"""Racing: a candidate stops being scored once it is clearly worse than the best so far.

Every candidate is first scored on the same random quarter of each source's rows (at least
``MIN_ROWS``). It goes on to the other rows only if it could still beat the incumbent, the best
candidate scored in full: in a paired bootstrap over those first rows (both candidates scored on
the same rows), it has to rank ahead in at least ``PRUNE_BELOW`` of the resamples. Only
candidates scored in full can be picked, so racing saves the rest of the scoring of candidates
that the first rows already show losing; merges are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from mergekit_fisher.search.score import RowScores, objective_values

FIRST_SHARE = 0.25
MIN_ROWS = 8
PRUNE_BELOW = 0.01
RESAMPLES = 2000


def split_rows(rows: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """The rows every candidate is scored on first, and the rest: a fixed shuffle, so the
    file's order (often sorted by task or length) does not choose them."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).tolist()
    first = max(MIN_ROWS, math.ceil(rows * FIRST_SHARE))
    return order[:first], order[first:]


def chance_ahead(
    candidate: Mapping[str, RowScores],
    incumbent: Mapping[str, RowScores],
    kind: str,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> float:
    """The share of paired bootstrap resamples of the rows (per source) in which ``candidate``
    ranks ahead of ``incumbent``: a lower objective, or an equal one and a lower ``tasks``
    loss (the search's own order); a full tie counts half (no evidence either way)."""
    generator = torch.Generator().manual_seed(seed)
    picks = {
        source: torch.randint(len(rows.nll), (resamples, len(rows.nll)), generator=generator)
        for source, rows in candidate.items()
    }
    ours, theirs = (_resampled(side, picks) for side in (candidate, incumbent))
    key = [(objective_values(*ours, kind), objective_values(*ours, "tasks"))]
    key.append((objective_values(*theirs, kind), objective_values(*theirs, "tasks")))
    (value, tiebreak), (best, best_tiebreak) = key
    ahead = (value < best) | ((value == best) & (tiebreak < best_tiebreak))
    tied = (value == best) & (tiebreak == best_tiebreak)
    return float(ahead.double().mean() + tied.double().mean() / 2)


def _resampled(
    scores: Mapping[str, RowScores], picks: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Per-source totals ([sources, resamples]) of nll, tokens, exact rows and rows."""
    totals = []
    for source, index in picks.items():
        rows = scores[source]
        count = torch.full((index.shape[0],), float(index.shape[1]), dtype=torch.float64)
        totals.append(
            (
                rows.nll[index].sum(1),
                rows.tokens[index].sum(1).double(),
                rows.hit[index].sum(1).double(),
                count,
            )
        )
    return tuple(torch.stack(column) for column in zip(*totals))
