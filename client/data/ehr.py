"""Read a site's EHR table through its ``site.toml`` column mapping and encode it.

The run's :class:`TaskConfig` names features and labels; ``[ehr]``,
``[ehr.features]`` and ``[ehr.labels]`` in ``site.toml`` say which of the site's
columns hold them. Only those columns are read. The encoded EHR vector has the
layout of ``TaskConfig.ehr_width``::

    [numeric values, normalised with the task's mean/std, missing -> 0]
    [one missingness flag per numeric feature (1 = missing)]
    [per categorical feature: one-hot over its vocabulary, then an 'unknown' slot]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ...common.config import TaskConfig
from ...common.errors import DataError
from ..site_config import EhrSchema


@dataclass(frozen=True)
class EhrColumns:
    """The site's column names for everything the run needs."""

    patient_id: str
    study_uid: str
    note: str | None
    features: dict[str, str]
    labels: dict[str, str]
    note_required: bool

    @property
    def all(self) -> list[str]:
        """Every declared column, without duplicates, in a stable order."""
        names = [self.patient_id, self.study_uid]
        if self.note:
            names.append(self.note)
        names += list(self.features.values()) + list(self.labels.values())
        return list(dict.fromkeys(names))


def declared_columns(task: TaskConfig, schema: EhrSchema) -> EhrColumns:
    """Resolve the run's names to this site's columns."""
    features = [*task.numeric, *task.categorical]
    return EhrColumns(
        patient_id=schema.patient_id,
        study_uid=schema.study_uid,
        note=schema.note or None,
        features={name: schema.feature_column(name) for name in features},
        labels={name: schema.label_column(name) for name in task.labels},
        note_required="note" in schema.model_fields_set and bool(schema.note),
    )


def _missing_problems(cols: EhrColumns, have: set[str]) -> list[str]:
    problems = []

    def check(column: str, what: str, key: str) -> None:
        if column not in have:
            problems.append(
                f'  - {column!r} ({what}): set `{key} = "<column>"` in site.toml'
            )

    check(cols.patient_id, "patient id", "[ehr] patient-id")
    check(cols.study_uid, "study uid, joins DICOM StudyInstanceUID", "[ehr] study-uid")
    if cols.note and cols.note_required:
        check(cols.note, "free-text note", "[ehr] note")
    for name, column in cols.features.items():
        check(column, f"feature {name}", f"[ehr.features] {name}")
    for name, column in cols.labels.items():
        check(column, f"label {name}", f"[ehr.labels] {name}")
    return problems


def open_ehr(path: Path, task: TaskConfig, schema: EhrSchema) -> tuple[pads.Dataset, list[str]]:
    """Open the EHR dataset and check its schema; return it and the columns to read.

    Reads no rows: every declared column that is missing is reported at once.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"EHR table {path} not found",
            hint="Fix `data.ehr` in site.toml (a Parquet file or a folder of them, "
            "relative to site.toml).",
        )
    try:
        dataset = pads.dataset(path, format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"EHR table {path} is not readable Parquet: {exc}",
            hint="Point `data.ehr` in site.toml at a Parquet file or folder.",
        ) from None
    cols = declared_columns(task, schema)
    have = set(dataset.schema.names)
    problems = _missing_problems(cols, have)
    if problems:
        raise DataError(
            f"EHR table {path} lacks {len(problems)} declared column(s):\n"
            + "\n".join(problems)
            + "\nThe table has columns: "
            + ", ".join(sorted(have)),
            hint="Map the run's names to your columns in site.toml under [ehr], "
            "[ehr.features] and [ehr.labels].",
        )
    return dataset, [c for c in cols.all if c in have]


def read_ehr(path: Path, task: TaskConfig, schema: EhrSchema) -> pa.Table:
    """Read only the declared columns of the EHR Parquet file or dataset folder.

    The table keeps the site's own column names. When ``note`` is not declared in
    site.toml and the default ``note`` column is absent, notes are simply absent.
    """
    dataset, wanted = open_ehr(path, task, schema)
    return dataset.to_table(columns=wanted)


class EncodedEhr(NamedTuple):
    """The EHR rows as arrays, in the table's row order."""

    features: np.ndarray  # float32 [n, task.ehr_width]
    labels: np.ndarray  # float32 [n, len(task.labels)], null -> 0
    notes: list[str]  # "" where absent
    patient_ids: list[str | None]
    study_uids: list[str | None]
    label_null: np.ndarray  # bool [n, len(task.labels)]: the cell was null

    @property
    def null_labels(self) -> int:
        """How many label cells were null (counted as 0)."""
        return int(self.label_null.sum())


def _as_float(table: pa.Table, column: str, problems: list[str]) -> np.ndarray:
    array = table.column(column)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        problems.append(f"  - column {column!r} holds text; it must be numeric")
        return np.full(len(array), np.nan)
    try:
        cast = pc.cast(array, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        problems.append(
            f"  - column {column!r} has type {array.type}; it must be numeric"
        )
        return np.full(len(array), np.nan)
    return cast.to_numpy(zero_copy_only=False).astype(np.float64)


def _as_text(table: pa.Table, column: str) -> list[str | None]:
    return pc.cast(table.column(column), pa.string()).to_pylist()


def encode_ehr(table: pa.Table, task: TaskConfig, schema: EhrSchema) -> EncodedEhr:
    """Encode features (see module docstring), labels, notes and keys."""
    cols = declared_columns(task, schema)
    n = table.num_rows
    problems: list[str] = []
    numeric = np.zeros((n, len(task.numeric)), np.float32)
    missing = np.zeros((n, len(task.numeric)), np.float32)
    for j, (name, stats) in enumerate(task.numeric.items()):
        values = _as_float(table, cols.features[name], problems)
        absent = ~np.isfinite(values)
        numeric[:, j] = np.where(absent, 0.0, (values - stats.mean) / stats.std)
        missing[:, j] = absent
    onehots = []
    for name, vocab in task.categorical.items():
        texts = _as_text(table, cols.features[name])
        block = np.zeros((n, len(vocab) + 1), np.float32)
        slot = {v: i for i, v in enumerate(vocab)}
        for i, value in enumerate(texts):
            block[
                i, slot.get(value, len(vocab)) if value is not None else len(vocab)
            ] = 1.0
        onehots.append(block)
    labels = np.zeros((n, len(task.labels)), np.float32)
    label_null = np.zeros((n, len(task.labels)), bool)
    for k, name in enumerate(task.labels):
        values = _as_float(table, cols.labels[name], problems)
        label_null[:, k] = np.isnan(values)
        labels[:, k] = np.where(label_null[:, k], 0.0, values != 0)
    if problems:
        raise DataError(
            f"EHR columns with unusable types ({len(problems)}):\n"
            + "\n".join(problems),
            hint="Convert these columns to numbers, or map other columns in site.toml.",
        )
    if cols.note and cols.note in table.column_names:
        notes = [t or "" for t in _as_text(table, cols.note)]
    else:
        notes = [""] * n
    features = np.concatenate([numeric, missing, *onehots], axis=1).astype(np.float32)
    assert features.shape[1] == task.ehr_width
    return EncodedEhr(
        features=features,
        labels=labels,
        notes=notes,
        patient_ids=_as_text(table, cols.patient_id),
        study_uids=_as_text(table, cols.study_uid),
        label_null=label_null,
    )
