"""Which DICOM files make a study's image, and which EHR rows join which study.

A study's image comes from one series: the usable series with the most instances
(ties: the one whose first file sorts first), its files in slice order
(``ImagePositionPatient`` z, else ``SliceLocation``, then ``InstanceNumber``,
then path). A multi-frame file is a series of one file. Files that repeat a SOP Instance
UID (a re-send, a copy in another transfer syntax) are one instance: the first
read without warning, in path order, is used, so training never counts one image
twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .decode import OK
from .ehr import EncodedEhr

_COLUMNS = (
    "path",
    "study_uid",
    "series_uid",
    "sop_uid",
    "size",
    "mtime_ns",
    "instance_number",
    "slice_position",
)


def study_series(index: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """Study UID -> the rows of its chosen series, in slice order; sorted by UID.

    An instance is used once: of the usable files that share a SOP Instance UID,
    the first that pydicom read without warning, in path order (the rule of
    ``site deid``; :func:`duplicate_instances` counts the others).
    """
    usable = index.filter(pc.equal(index.column("status"), OK))
    usable = usable.select([*_COLUMNS, "warnings"])
    by_study: dict[str, dict[str, list[dict[str, Any]]]] = {}
    seen: set[str] = set()
    ranked = sorted(usable.to_pylist(), key=lambda r: (bool(r["warnings"]), r["path"]))
    for row in ranked:
        if not row["study_uid"]:
            continue
        if row["sop_uid"] in seen:
            continue
        seen.add(row["sop_uid"])
        series = row["series_uid"] or row["sop_uid"] or row["path"]
        by_study.setdefault(row["study_uid"], {}).setdefault(series, []).append(row)
    chosen: dict[str, list[dict[str, Any]]] = {}
    for study in sorted(by_study):
        groups = by_study[study].values()
        best = min(groups, key=lambda rows: (-len(rows), min(r["path"] for r in rows)))
        chosen[study] = sorted(best, key=_slice_key)
    return chosen


def duplicate_instances(index: pa.Table) -> int:
    """Usable files whose SOP Instance UID an earlier usable file already has."""
    usable = index.filter(pc.equal(index.column("status"), OK))
    sops = [s for s in usable.column("sop_uid").to_pylist() if s]
    return len(sops) - len(set(sops))


def _slice_key(row: dict[str, Any]) -> tuple:
    pos = row["slice_position"]
    num = row["instance_number"]
    return (pos is None, pos or 0.0, num is None, num or 0, row["path"])


def first_image_per_study(index: pa.Table) -> dict[str, dict[str, Any]]:
    """Study UID -> the middle instance of its chosen series (compatibility)."""
    return {s: rows[len(rows) // 2] for s, rows in study_series(index).items()}


def index_fingerprint(images: dict[str, list[dict[str, Any]]]) -> str:
    """sha256 over the studies' UIDs and file sizes (not paths, not mtimes)."""
    h = hashlib.sha256()
    for study, rows in images.items():
        h.update(study.encode() + b"\x1f")
        for row in rows:
            for part in (row["series_uid"] or "", row["sop_uid"], str(row["size"])):
                h.update(part.encode())
                h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()


@dataclass(frozen=True)
class Join:
    """EHR rows used (row numbers, sorted by study UID) and coverage counts."""

    rows: list[int]  # EHR rows that become items
    with_image: list[bool]  # per item: the study has an image series
    ehr_studies: int  # distinct EHR studies with a patient id
    ehr_with_image: int
    dicom_studies: int
    dicom_with_ehr: int
    duplicates: int  # EHR rows repeating a study already seen
    no_key: int  # EHR rows without patient id or study uid
    conflicting: int = 0
    """Studies with a repeated row whose labels disagree with the first row's (on a
    label both rows know): the first row's are used, which may be the wrong ones."""


def join_ehr_images(
    ehr: EncodedEhr, images: dict[str, list[dict[str, Any]]], *, require_image: bool
) -> Join:
    """Join EHR rows to studies on the study UID (first row per study wins)."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    duplicates = no_key = 0
    for i, study in enumerate(ehr.study_uids):
        if study is None or ehr.patient_ids[i] is None:
            no_key += 1
        elif study in first:
            duplicates += 1
            j = first[study]
            known = ~(ehr.label_null[i] | ehr.label_null[j])
            if (ehr.labels[i][known] != ehr.labels[j][known]).any():
                conflicting.add(study)
        else:
            first[study] = i
    ordered = sorted(first)
    with_image = [s in images for s in ordered]
    if require_image:
        ordered = [s for s, ok in zip(ordered, with_image, strict=True) if ok]
        with_image = [True] * len(ordered)
    n_with = sum(1 for s in first if s in images)
    return Join(
        rows=[first[s] for s in ordered],
        with_image=with_image,
        ehr_studies=len(first),
        ehr_with_image=n_with,
        dicom_studies=len(images),
        dicom_with_ehr=n_with,
        duplicates=duplicates,
        no_key=no_key,
        conflicting=len(conflicting.intersection(ordered)),  # of those trained on
    )
