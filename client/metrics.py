"""Evaluation metrics over predictions (pure, numpy)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc_per_label(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC per label column; NaN where a column has only one class."""
    out = np.full(labels.shape[1], np.nan)
    for k in range(labels.shape[1]):
        y = labels[:, k]
        if 0 < y.sum() < len(y):
            out[k] = roc_auc_score(y, scores[:, k])
    return out


def macro_auroc(per_label: np.ndarray) -> float:
    """Mean AUROC over the labels that have both classes (NaN if none)."""
    ok = np.isfinite(per_label)
    return float(per_label[ok].mean()) if ok.any() else float("nan")
