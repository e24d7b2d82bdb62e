"""Evaluation metrics over predictions (pure, numpy)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc_per_label(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC per label column; NaN where a column has only one class.

    Scores that are all equal within float rounding give 0.5.

    A NaN label (the site's cell was empty or unmapped) leaves that example out of
    its column's AUROC: an unknown finding is neither a positive nor a negative.
    """
    out = np.full(labels.shape[1], np.nan)
    for k in range(labels.shape[1]):
        known = ~np.isnan(labels[:, k])
        y = labels[known, k]
        if 0 < y.sum() < len(y):
            column = np.asarray(scores[known, k], np.float64)
            # Scores equal up to float rounding (a model that gives every example
            # the same output, e.g. an absent modality) rank nothing: chance.
            scale = max(1.0, float(np.abs(column).max()))
            if float(np.ptp(column)) <= _TIED * scale:
                out[k] = 0.5
            else:
                out[k] = roc_auc_score(y, column)
    return out


_TIED = 1e-6  # a few float32 steps around 1; real models spread far wider


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


def mean_log_loss(labels: np.ndarray, log_p: np.ndarray, log_q: np.ndarray) -> float:
    """Mean binary cross-entropy over the known (non-NaN) label cells (NaN if none).

    From the log-probabilities of a positive (``log_p``) and of a negative
    (``log_q``), so that a confident miss costs what it costs from the logits.
    """
    known = ~np.isnan(labels)
    if not known.any():
        return float("nan")
    y = labels[known]
    # a cell's other term is left out, not multiplied by 0 (0 · −inf is NaN)
    with np.errstate(invalid="ignore"):
        positive = np.where(y > 0, y * log_p[known], 0.0)
        negative = np.where(y < 1, (1.0 - y) * log_q[known], 0.0)
    return float(-(positive + negative).mean())
