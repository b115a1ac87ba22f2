"""ROC AUC in plain numpy (no scikit-learn): the Mann-Whitney U statistic with average ranks.

``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)`` where ``R_pos`` is the sum of the
ranks of the positive samples among all scores, tied scores sharing their average rank. This is
the probability that a random positive scores above a random negative, ties counting one half.
"""
from __future__ import annotations

import numpy as np

from hybridps.errors import DataError

__all__ = ["roc_auc"]


def roc_auc(labels, scores) -> float:
    """ROC AUC of ``scores`` against binary ``labels`` (0/1 or bool), ties handled exactly.

    Returns NaN when the labels hold only one class (AUC is undefined there).
    Raises DataError for mismatched lengths, labels other than 0/1, or non-finite scores.
    """
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise DataError(f"roc_auc: labels and scores differ in length ({y.size} vs {s.size})")
    if y.dtype == np.bool_:
        pos = y
    else:
        yf = y.astype(np.float64)
        pos = yf == 1.0
        if not np.all(pos | (yf == 0.0)):
            bad = yf[~(pos | (yf == 0.0))][0]
            raise DataError(f"roc_auc: labels must be 0 or 1, found {bad!r}")
    if not np.all(np.isfinite(s)):
        raise DataError("roc_auc: scores contain NaN or Inf")
    n = s.size
    n_pos = int(np.count_nonzero(pos))
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # tie groups in sorted order: [starts[g], ends[g]) share the average 1-based rank
    boundary = np.empty(n, dtype=bool)
    boundary[0] = True
    np.not_equal(sorted_s[1:], sorted_s[:-1], out=boundary[1:])
    starts = np.flatnonzero(boundary)
    ends = np.append(starts[1:], n)
    avg_rank = (starts + 1 + ends) / 2.0
    group_of = np.cumsum(boundary) - 1
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg_rank[group_of]
    r_pos = float(ranks[pos].sum())
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
