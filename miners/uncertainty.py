"""Single-model uncertainty scores over class probabilities: the miners' name for them.

The functions live in :mod:`indexing.measures`, the leaf module of pure measures that
every layer shares (the miners, scoring at the edge, collection analytics); they are
re-exported here so ``from miners.uncertainty import margin_scores`` keeps working. See
that module for the conventions (``(N, C)`` float input, ``ValueError`` on invalid rows,
higher = more informative).
"""

from __future__ import annotations

from indexing.measures import (  # noqa: F401 -- re-exported; _TINY/_xlogx for miners.bayesian
    _TINY,
    ROW_SUM_TOLERANCE,
    _xlogx,
    entropy_nats,
    entropy_scores,
    least_confidence_scores,
    margin_scores,
    ratio_scores,
    softmax,
    validate_probs,
)

__all__ = [
    "ROW_SUM_TOLERANCE",
    "entropy_scores",
    "least_confidence_scores",
    "margin_scores",
    "ratio_scores",
    "softmax",
    "validate_probs",
]
