"""The wide term: logistic regression on a note's hashed word n-grams and the EHR.

Added to the fusion model's logits (wide & deep), it puts the model a statistician
would fit inside the neural one, and is that model alone in the study's classical
reference arm. The note is a binary bag of n-grams, L2-normalised; the EHR features
are the site's encoded vector (scaled values, missingness indicators, one-hot
categories). :func:`bag_matrix` gives the same features as a sparse matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def bag_weights(note_ngrams: torch.Tensor, note_present: torch.Tensor) -> torch.Tensor:
    """[B, K] weights of a binary bag of the ids > 0, L2-normalised; 0 for no note."""
    mask = (note_ngrams > 0).to(note_present.dtype) * note_present.unsqueeze(-1)
    return mask / mask.sum(1, keepdim=True).clamp_min(1).sqrt()


class NgramTable(nn.Embedding):
    """The weights of a note's hashed n-grams: one row per bucket, one column per label.

    An ``nn.Embedding`` in all but its type. The type is what lets DP training
    (``client/dp_rows.py``) keep each example's gradient as the few rows its note
    touched, where Opacus's ``nn.Embedding`` sampler builds a dense copy of the
    whole table per example.
    """


class WideTerm(nn.Module):
    """Linear logits [B, labels] from hashed note n-grams and EHR features.

    Zero at start: an untrained fusion model is its deep part alone.
    """

    def __init__(self, buckets: int, ehr_width: int, n_labels: int) -> None:
        super().__init__()
        self.note = NgramTable(buckets, n_labels) if buckets else None
        self.ehr = nn.Linear(ehr_width, n_labels, bias=False) if ehr_width else None
        self.bias = nn.Linear(1, n_labels, bias=False)  # the intercept, per label
        for layer in (self.note, self.ehr, self.bias):
            if layer is not None:
                nn.init.zeros_(layer.weight)

    def forward(
        self,
        ehr: torch.Tensor,
        note_ngrams: torch.Tensor | None,
        present: torch.Tensor,
    ) -> torch.Tensor:
        """``present`` [B, 3] as the fusion model's (image, EHR, note)."""
        out: torch.Tensor = self.bias(present.new_ones(present.shape[0], 1))
        if self.ehr is not None:
            out = out + self.ehr(ehr) * present[:, 1:2]
        if self.note is not None and note_ngrams is not None:
            weight = bag_weights(note_ngrams, present[:, 2])
            out = out + (self.note(note_ngrams) * weight.unsqueeze(-1)).sum(1)
        return out


def bag_matrix(
    note_ngrams: np.ndarray, ehr: np.ndarray, present: np.ndarray, buckets: int
) -> Any:
    """The wide term's features as a CSR matrix [n, buckets + ehr width]."""
    from scipy import sparse

    weights = bag_weights(
        torch.from_numpy(note_ngrams), torch.from_numpy(present[:, 2])
    ).numpy()
    rows, cols = np.nonzero(note_ngrams > 0)
    notes = sparse.csr_matrix(
        (weights[rows, cols], (rows, note_ngrams[rows, cols])),
        shape=(len(note_ngrams), buckets),
    )
    # duplicate ids cannot occur: hash_note_ngrams keeps each bucket once per note
    tabular = sparse.csr_matrix(ehr * present[:, 1:2])
    return sparse.hstack([notes, tabular]).tocsr()
