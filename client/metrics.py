"""Evaluation metrics over predictions (pure, numpy)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc_per_label(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC per label column; NaN where a column has only one class.

    A NaN label (the site's cell was empty or unmapped) leaves that example out of
    its column's AUROC: an unknown finding is neither a positive nor a negative.
    """
    out = np.full(labels.shape[1], np.nan)
    for k in range(labels.shape[1]):
        known = ~np.isnan(labels[:, k])
        y = labels[known, k]
        if 0 < y.sum() < len(y):
            out[k] = roc_auc_score(y, scores[known, k])
    return out


def labels_or_unknown(labels: np.ndarray, known: np.ndarray | None) -> np.ndarray:
    """``labels`` with NaN where ``known`` is 0 (all known without a mask)."""
    labels = np.asarray(labels, np.float64)
    if known is None:
        return labels
    return np.where(np.asarray(known) > 0.5, labels, np.nan)


def macro_auroc(per_label: np.ndarray) -> float:
    """Mean AUROC over the labels that have both classes (NaN if none)."""
    ok = np.isfinite(per_label)
    return float(per_label[ok].mean()) if ok.any() else float("nan")
