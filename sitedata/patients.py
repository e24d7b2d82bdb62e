"""The patient as DP-SGD's privacy unit: whose each study is, one study per patient.

A site's datasets hold one item per study, and a patient may have several studies.
Under DP-SGD Opacus Poisson-samples *patients* (a dataset of one item per patient,
:class:`OneStudyPerPatient`); a sampled patient gives one of their studies, drawn
at random. So one patient changes a step by at most one clipped per-example
gradient, and Opacus's accounting at its sample rate is per patient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..common.errors import DataError


def patient_ordinals(patient_ids: Sequence[str]) -> np.ndarray:
    """int64 per item: its patient's number (0, 1, ... in first-seen order).

    The ids themselves stay out of the datasets; only which items share a
    patient is kept.
    """
    number: dict[str, int] = {}
    return np.array([number.setdefault(p, len(number)) for p in patient_ids], np.int64)


def patients_of(studies: Dataset) -> np.ndarray:
    """The per-item patient numbers a study dataset carries (``patients``).

    Raises DataError when it carries none: DP-SGD would then bound a study,
    not a patient.
    """
    patients = getattr(studies, "patients", None)
    if patients is None:
        raise DataError(
            f"the training data ({type(studies).__name__}) do not say which "
            "patient each study belongs to, so DP-SGD cannot bound a patient's "
            "contribution",
            hint="Build site data with wardround's loaders (load_site_data, "
            "load_vlm_site_data), which tag every study with its patient.",
        )
    patients = np.asarray(patients, np.int64)
    if len(patients) != len(studies):  # type: ignore[arg-type]
        raise ValueError(
            f"{len(patients)} patient numbers for {len(studies)} studies"  # type: ignore[arg-type]
        )
    return patients


def count_patients(patients: np.ndarray) -> int:
    """How many distinct patients ``patients`` (per-item numbers) names."""
    return len(np.unique(patients))


def max_studies_per_patient(patients: np.ndarray) -> int:
    """The most studies one patient has (0 for no items)."""
    return int(np.unique(patients, return_counts=True)[1].max(initial=0))


class OneStudyPerPatient(Dataset):
    """Item ``p`` is one of patient ``p``'s studies, drawn anew at every access.

    The draw uses ``generator`` (uniform over the patient's studies), so a round
    is reproducible when the generator is seeded.
    """

    def __init__(
        self, studies: Dataset, patients: np.ndarray, generator: torch.Generator
    ) -> None:
        _, dense = np.unique(patients, return_inverse=True)
        order = np.argsort(dense, kind="stable")
        bounds = np.cumsum(np.bincount(dense))[:-1]
        self.studies = studies
        self.studies_of: list[np.ndarray] = (
            np.split(order, bounds) if len(order) else []
        )
        """Per patient, the positions of their studies in ``studies``."""
        self.generator = generator

    def __len__(self) -> int:
        return len(self.studies_of)

    def __getitem__(self, patient: int) -> Any:
        own = self.studies_of[patient]
        pick = int(torch.randint(len(own), (1,), generator=self.generator))
        return self.studies[int(own[pick])]
