"""Coefficient and method search: pick a merge by held-out loss on validation data.

Matena & Raffel tune per-model coefficients on validation data; the choice between averaging
and task-vector merges belongs there too. ``candidates`` builds one recipe's ``--grid``,
``methods`` a default grid per method (``--methods``), ``score`` the per-source loss and the
objective, ``run`` merges and scores every candidate.
"""

from mergekit_fisher.search.candidates import (
    Candidate,
    SearchError,
    candidates_for,
    edge_warnings,
    parse_grid,
)
from mergekit_fisher.search.methods import METHOD_GRIDS, method_candidates, parse_methods
from mergekit_fisher.search.run import Scored, SearchResult, report, search
from mergekit_fisher.search.score import OBJECTIVES, SourceLoss, objective

__all__ = [
    "METHOD_GRIDS",
    "OBJECTIVES",
    "Candidate",
    "Scored",
    "SearchError",
    "SearchResult",
    "SourceLoss",
    "candidates_for",
    "edge_warnings",
    "method_candidates",
    "objective",
    "parse_grid",
    "parse_methods",
    "report",
    "search",
]
