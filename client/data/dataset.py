"""A site's training and validation data: EHR ⋈ DICOM index, split per patient.

``load_site_data`` joins the EHR rows with the DICOM index on the study UID (one
image per study: the first usable SOP instance by sorted path), splits patients
deterministically into train and validation, decodes the images (cached as
``.npy`` keyed by the index fingerprint and image size, so later rounds skip DICOM
decoding) and materialises every item as tensors in memory.

Each item is a dict::

    image      float32 [1, S, S]   in [0, 1] (zeros when the image failed to decode)
    ehr        float32 [task.ehr_width]
    note_ids   int64   [L]          L = max_note_tokens
    note_mask  int64   [L]
    labels     float32 [len(task.labels)]   in task.labels order, null -> 0
    present    float32 [3]          (image, ehr, note) present: 1, absent: 0
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from ...common.config import TaskConfig
from ...common.errors import DataError
from ..site_config import SiteConfig
from .dicom_index import OK, index_dicom
from .ehr import EncodedEhr, encode_ehr, read_ehr
from .image import load_image

logger = logging.getLogger(__name__)

ITEM_KEYS = ("image", "ehr", "note_ids", "note_mask", "labels", "present")


class TensorDictDataset(Dataset):
    """Items are slices of in-memory tensors that share their first dimension."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors differ in length: {sorted(lengths)}")
        self.tensors = tensors
        self._len = lengths.pop()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: tensor[index] for key, tensor in self.tensors.items()}


@dataclass(frozen=True)
class SiteData:
    """A site's datasets and what a site check or a manifest reports about them."""

    train: Dataset
    validation: Dataset
    fingerprint: str  # sha256 hex over the index (UIDs + sizes) and the EHR rows used
    num_studies: int
    num_unmatched_ehr: int
    num_unmatched_images: int
    num_null_labels: int = 0
    num_image_errors: int = 0
    num_duplicate_ehr: int = 0


def validation_side(patient_id: str, split_seed: int, fraction: float) -> bool:
    """Deterministic per-patient split: True puts the patient in validation."""
    digest = hashlib.sha256(f"{split_seed}\x1f{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_patients(
    patient_ids: list[str], split_seed: int, fraction: float
) -> np.ndarray:
    """Boolean mask (True = validation) over items; a patient is on one side only.

    With two or more patients both sides are kept non-empty.
    """
    unique = sorted(set(patient_ids))
    side = {p: validation_side(p, split_seed, fraction) for p in unique}
    if len(unique) >= 2 and (all(side.values()) or not any(side.values())):
        ranked = sorted(
            unique,
            key=lambda p: hashlib.sha256(f"{split_seed}\x1f{p}".encode()).digest(),
        )
        flip = ranked[0] if not any(side.values()) else ranked[-1]
        side[flip] = not side[flip]
    return np.array([side[p] for p in patient_ids], dtype=bool)


def first_image_per_study(index: pa.Table) -> dict[str, dict[str, Any]]:
    """Study UID -> index row of its first usable instance (by sorted path)."""
    rows = [r for r in index.to_pylist() if r["status"] == OK and r["study_uid"]]
    rows.sort(key=lambda r: r["path"])
    chosen: dict[str, dict[str, Any]] = {}
    for row in rows:
        chosen.setdefault(row["study_uid"], row)
    return dict(sorted(chosen.items()))


def _index_fingerprint(images: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for study, row in images.items():
        for part in (study, row["series_uid"] or "", row["sop_uid"], str(row["size"])):
            h.update(part.encode())
            h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()


def _decoded_images(
    images: dict[str, dict[str, Any]], image_size: int, cache_dir: Path
) -> np.ndarray:
    """float32 [n_studies, S, S] aligned with ``images``; NaN rows failed to decode.

    Cached as ``images-<fingerprint>-<S>.npy``; the key also covers mtimes, so a
    replaced file of the same size is decoded again.
    """
    key = hashlib.sha256(_index_fingerprint(images).encode())
    for row in images.values():
        key.update(f"{row['path']}\x1f{row['mtime_ns']}\x1e".encode())
    cache = cache_dir / f"images-{key.hexdigest()[:24]}-{image_size}.npy"
    if cache.is_file():
        try:
            array = np.load(cache, allow_pickle=False)
            if array.shape == (len(images), image_size, image_size):
                logger.info(
                    "decoded images loaded from cache (%d studies)", len(images)
                )
                return array
        except (OSError, ValueError) as exc:
            logger.warning(
                "image cache unreadable (%s); decoding again", type(exc).__name__
            )
    array = np.full((len(images), image_size, image_size), np.nan, np.float32)
    for i, row in enumerate(images.values()):
        try:
            array[i] = load_image(Path(row["path"]), image_size)
        except DataError:
            pass  # counted by the caller; the item keeps its EHR and note
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(f"images-*-{image_size}.npy"):
        stale.unlink(missing_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    tmp.replace(cache)
    return array


def load_site_data(
    site: SiteConfig,
    task: TaskConfig,
    *,
    image_size: int,
    max_note_tokens: int,
    tokenizer,
) -> SiteData:
    """Index, read, join, split and materialise a site's data."""
    index = index_dicom(site.dicom_paths, site.cache_path)
    images = first_image_per_study(index)
    table = read_ehr(site.ehr_path, task, site.ehr)
    ehr = encode_ehr(table, task, site.ehr)

    rows, seen, duplicates = [], set(), 0
    for i, study in enumerate(ehr.study_uids):
        if study is None or ehr.patient_ids[i] is None:
            continue
        if study in seen:
            duplicates += 1
            continue
        seen.add(study)
        rows.append(i)
    matched = sorted(
        (i for i in rows if ehr.study_uids[i] in images),
        key=lambda i: ehr.study_uids[i],
    )
    unmatched_ehr = len(rows) - len(matched)
    unmatched_images = len(set(images) - seen)
    if not matched:
        raise DataError(
            f"no EHR row matches a DICOM study ({len(rows)} EHR studies, "
            f"{len(images)} DICOM studies)",
            hint="Check that `[ehr] study-uid` in site.toml names the column holding "
            "the DICOM StudyInstanceUID, and that data.dicom-dirs is right.",
        )

    decoded = _decoded_images(images, image_size, site.cache_path)
    position = {study: j for j, study in enumerate(images)}
    image = decoded[[position[ehr.study_uids[i]] for i in matched]]
    image_ok = ~np.isnan(image).any(axis=(1, 2))
    image = np.where(image_ok[:, None, None], image, 0.0).astype(np.float32)

    notes = [ehr.notes[i] for i in matched]
    encoded = tokenizer(
        notes,
        padding="max_length",
        truncation=True,
        max_length=max_note_tokens,
        return_tensors="np",
    )
    features = ehr.features[matched]
    n_numeric, n_cat = len(task.numeric), len(task.categorical)
    ehr_present = (
        (features[:, n_numeric : 2 * n_numeric] < 0.5).any(axis=1)
        if n_numeric
        else np.ones(len(matched), bool)
    )
    if n_cat:
        known = _known_categorical(features, task)
        ehr_present = ehr_present | known
    present = np.stack(
        [image_ok, ehr_present, np.array([bool(t.strip()) for t in notes])], axis=1
    ).astype(np.float32)

    tensors = {
        "image": torch.from_numpy(image[:, None]),
        "ehr": torch.from_numpy(features),
        "note_ids": torch.from_numpy(np.asarray(encoded["input_ids"], np.int64)),
        "note_mask": torch.from_numpy(np.asarray(encoded["attention_mask"], np.int64)),
        "labels": torch.from_numpy(ehr.labels[matched]),
        "present": torch.from_numpy(present),
    }
    patients = [ehr.patient_ids[i] for i in matched]
    in_val = split_patients(
        patients, site.data.split_seed, site.data.validation_fraction
    )
    val_idx = torch.from_numpy(np.flatnonzero(in_val))
    train_idx = torch.from_numpy(np.flatnonzero(~in_val))
    null_labels = int(ehr.label_null[matched].sum())
    fingerprint = _fingerprint(images, ehr, matched)
    n_errors = int((~image_ok).sum())
    if n_errors:
        logger.warning(
            "%d of %d images could not be decoded; kept without image",
            n_errors,
            len(matched),
        )
    if null_labels:
        logger.warning("%d null label cells were counted as 0", null_labels)
    logger.info(
        "site data: %d studies (%d train, %d validation), %d EHR rows without image, "
        "%d images without EHR row, %d duplicate EHR rows",
        len(matched),
        len(train_idx),
        len(val_idx),
        unmatched_ehr,
        unmatched_images,
        duplicates,
    )
    return SiteData(
        train=TensorDictDataset({k: v[train_idx] for k, v in tensors.items()}),
        validation=TensorDictDataset({k: v[val_idx] for k, v in tensors.items()}),
        fingerprint=fingerprint,
        num_studies=len(matched),
        num_unmatched_ehr=unmatched_ehr,
        num_unmatched_images=unmatched_images,
        num_null_labels=null_labels,
        num_image_errors=n_errors,
        num_duplicate_ehr=duplicates,
    )


def _known_categorical(features: np.ndarray, task: TaskConfig) -> np.ndarray:
    start = 2 * len(task.numeric)
    known = np.zeros(len(features), bool)
    for vocab in task.categorical.values():
        block = features[:, start : start + len(vocab)]
        known |= block.sum(axis=1) > 0
        start += len(vocab) + 1
    return known


def _fingerprint(
    images: dict[str, dict[str, Any]], ehr: EncodedEhr, matched: list[int]
) -> str:
    h = hashlib.sha256(_index_fingerprint(images).encode())
    for i in matched:
        h.update((ehr.patient_ids[i] or "").encode() + b"\x1f")
        h.update((ehr.study_uids[i] or "").encode() + b"\x1f")
        h.update(ehr.features[i].tobytes())
        h.update(ehr.labels[i].tobytes())
        h.update(ehr.notes[i].encode() + b"\x1e")
    return h.hexdigest()
