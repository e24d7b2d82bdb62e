"""A site's training and validation data: EHR ⋈ DICOM index, split per patient.

``load_site_data`` joins the EHR rows with the DICOM index on the study UID (one
image per study, from its chosen series, see :mod:`.join`), splits patients
deterministically into train and validation, decodes the images (cached as
``.npy`` keyed by the index fingerprint, image size and slice mode, so later
rounds skip DICOM decoding; the reason of every failed study is cached beside it)
and materialises every item as tensors in memory. With ``task.require_image``
false, EHR rows whose study has no image are items too, without image; a site
without imaging (no ``data.dicom-dirs``) has only such items
(:mod:`.imaging`).

Each item is a dict::

    image      float32 [C, S, S]   in [0, 1], C = task.image_channels (zeros when
                                    the study has no usable image)
    ehr        float32 [task.ehr_width]
    note_ids   int64   [L]          L = max_note_tokens
    note_mask  int64   [L]
    note_ngrams int64  [K]          the note's hashed word n-grams (bucket ids, 0 pads),
                                    K = max_note_ngrams
    labels     float32 [len(task.labels)]   in task.labels order, null -> 0
    label_known float32 [len(task.labels)]  1 where the label cell had a usable value,
                                    0 where it was empty or unmapped: the loss and
                                    AUROC leave that (example, label) pair out
    present    float32 [3]          (image, ehr, note) present: 1, absent: 0
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from ..common.config import FusionModelConfig, RunConfig, TaskConfig
from ..common.errors import DataError
from ..common.text import hash_note_ngrams
from . import dicom_warnings
from .data_notes import write_data_notes
from .decode import DecodeFailure
from .dicom_index import INDEX_SCHEMA, file_path, index_dicom
from .ehr import EncodedEhr, read_encoded_ehr
from .ehr_source import ehr_source
from .image import load_study_image
from .imaging import no_imaging_error
from .join import Join, index_fingerprint, join_ehr_images, study_series
from .pacs import PacsSyncReport, sync_pacs
from .patients import count_patients, patient_ordinals
from .site_config import SiteConfig

logger = logging.getLogger(__name__)
_said: set[str] | None = None
"""Inside :func:`each_data_warning_once`: the warnings already logged."""


@contextmanager
def each_data_warning_once() -> Iterator[None]:
    """Log each distinct data warning once while the block runs (later at DEBUG).

    A study loads a site's data once per model configuration: the same finding
    about the same data would otherwise repeat for every arm. A site daemon
    does not use it: each run's log says what that run's data held.
    """
    global _said
    before, _said = _said, set() if _said is None else _said
    try:
        yield
    finally:
        _said = before


def _warn(message: str, *args: object) -> None:
    text = message % args
    if _said is not None:
        if text in _said:
            logger.debug(text)
            return
        _said.add(text)
    logger.warning(text)


ITEM_KEYS = (
    "image",
    "ehr",
    "note_ids",
    "note_mask",
    "note_ngrams",
    "labels",
    "label_known",
    "present",
)


class TensorDictDataset(Dataset):
    """Items are slices of in-memory tensors that share their first dimension.

    ``patients`` numbers each item's patient (see :mod:`.patients`); DP-SGD
    samples by it and refuses a dataset without it.
    """

    def __init__(
        self, tensors: dict[str, torch.Tensor], patients: np.ndarray | None = None
    ) -> None:
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors differ in length: {sorted(lengths)}")
        self.tensors = tensors
        self._len = lengths.pop()
        if patients is not None and len(patients) != self._len:
            raise ValueError(f"{len(patients)} patient numbers for {self._len} items")
        self.patients = patients

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: tensor[index] for key, tensor in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        """Bytes the items' tensors hold."""
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True)
class SiteData:
    """A site's datasets and what a site check or a manifest reports about them."""

    train: Dataset
    validation: Dataset
    fingerprint: str  # sha256 hex over the EHR rows used and their studies' images
    num_studies: int
    num_unmatched_ehr: int
    num_unmatched_images: int
    num_privacy_units: int
    """Training patients: DP-SGD samples them, and epsilon and delta are per patient."""
    num_null_labels: int = 0
    num_image_errors: int = 0
    num_duplicate_ehr: int = 0
    num_without_image: int = 0  # items kept without image (require_image false)

    @property
    def nbytes(self) -> int:
        """Bytes both splits hold in memory (their datasets' ``nbytes``)."""
        return sum(int(getattr(d, "nbytes", 0)) for d in (self.train, self.validation))


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


@dataclass(frozen=True)
class PreparedSite:
    """Everything between the raw stores and the tensors (shared with site check)."""

    index: pa.Table
    images: dict[str, list[dict[str, Any]]]
    ehr: EncodedEhr
    join: Join
    decoded: np.ndarray  # float32 [n_studies, C, S, S] aligned with images; NaN: failed
    reasons: dict[str, str]  # study UID -> why its image failed
    fingerprint: str
    pacs: PacsSyncReport | None = None  # the sync from [data.pacs], when named


def prepare_site(
    site: SiteConfig, task: TaskConfig, *, image_size: int
) -> PreparedSite:
    """Read, check, fetch, index, join and decode a site's data (no tensors, no split).

    With ``[data.pacs]`` the EHR's studies are first fetched into the cache
    (only what is not there yet) and indexed with the DICOM folders.
    """
    if not site.has_imaging and task.require_image:
        raise no_imaging_error(site)
    ehr = read_encoded_ehr(ehr_source(site), task, site.ehr)
    pacs = None
    if site.has_imaging:
        folders = site.dicom_paths
        if site.data.pacs is not None:
            wanted = [uid for uid in ehr.study_uids if uid]
            pacs = sync_pacs(site.data.pacs, site.base_dir, wanted, site.cache_path)
            folders = [*folders, pacs.folder]
        index = index_dicom(folders, site.cache_path)
    else:
        index = INDEX_SCHEMA.empty_table()
    images = study_series(index)
    join = join_ehr_images(ehr, images, require_image=task.require_image)
    decoded, reasons = decoded_images(images, image_size, task, site.cache_path)
    fingerprint = _fingerprint(images, ehr, join.rows)
    return PreparedSite(
        index, images, ehr, join, decoded, reasons, fingerprint, pacs=pacs
    )


def _cache_key(images: dict[str, list[dict[str, Any]]], task: TaskConfig) -> str:
    key = hashlib.sha256(index_fingerprint(images).encode())
    key.update(f"{task.slice_mode.value}/{task.image_channels}\x1e".encode())
    for rows in images.values():
        for row in rows:
            key.update(f"{row['path']}\x1f{row['mtime_ns']}\x1e".encode())
    return key.hexdigest()[:24]


def decoded_images(
    images: dict[str, list[dict[str, Any]]],
    image_size: int,
    task: TaskConfig,
    cache_dir: Path,
) -> tuple[np.ndarray, dict[str, str]]:
    """float32 [n_studies, C, S, S] aligned with ``images`` (NaN: failed) and reasons.

    Cached as ``images-<key>-<S>.npy`` plus ``.status.parquet`` (study, reason); the
    key covers UIDs, sizes, mtimes and the slice mode, so a changed file is
    decoded again.
    """
    channels = task.image_channels
    shape = (len(images), channels, image_size, image_size)
    cache = cache_dir / f"images-{_cache_key(images, task)}-{image_size}.npy"
    status = cache.with_suffix(".status.parquet")
    if cache.is_file() and status.is_file():
        try:
            array = np.load(cache, allow_pickle=False)
            table = pq.read_table(status)
            if array.shape == shape:
                logger.info(
                    "decoded images loaded from cache (%d studies)", len(images)
                )
                reasons: dict[str, str] = dict(
                    zip(
                        table.column("study_uid").to_pylist(),
                        table.column("reason").to_pylist(),
                        strict=True,
                    )
                )
                return array, reasons
        except (OSError, ValueError, pa.ArrowInvalid) as exc:
            logger.warning(
                "image cache unreadable (%s); decoding again", type(exc).__name__
            )
    array = np.full(shape, np.nan, np.float32)
    reasons = {}
    for i, (study, rows) in enumerate(images.items()):
        # pydicom's warnings go to the log, by kind (the index counts them per file)
        with dicom_warnings.capture() as kinds:
            try:
                array[i] = load_study_image(
                    [file_path(r["path"]) for r in rows],
                    image_size,
                    task.slice_mode,
                    channels,
                )
            except DecodeFailure as exc:
                reasons[study] = exc.reason  # the item keeps its EHR and note
        dicom_warnings.log_kinds(rows[0]["path"], kinds)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(f"images-*-{image_size}.*"):
        stale.unlink(missing_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    tmp.replace(cache)
    pq.write_table(
        pa.table(
            {"study_uid": list(reasons), "reason": list(reasons.values())},
            schema=pa.schema([("study_uid", pa.string()), ("reason", pa.string())]),
        ),
        status,
    )
    return array, reasons


def load_site_data_for_run(
    site: SiteConfig, task: TaskConfig, config: RunConfig, built: Any = None
) -> SiteData:
    """The fusion family's data loader (the family registry's entry)."""
    from ..common.text import get_tokenizer

    model = FusionModelConfig.of(config)
    return load_site_data(
        site,
        task,
        image_size=model.image_size,
        max_note_tokens=model.max_note_tokens,
        tokenizer=get_tokenizer(model.tokenizer),
        note_ngram_buckets=model.note_ngram_buckets,
        max_note_ngrams=model.max_note_ngrams,
    )


def load_site_data(
    site: SiteConfig,
    task: TaskConfig,
    *,
    image_size: int,
    max_note_tokens: int,
    tokenizer,
    note_ngram_buckets: int = 2**16,
    max_note_ngrams: int = 256,
) -> SiteData:
    """Index, read, join, split and materialise a site's data.

    Raises :class:`DataError` when no EHR row can become an item.
    """
    prep = prepare_site(site, task, image_size=image_size)
    _check_matched(site, prep.join)
    image, image_ok = _matched_images(prep, task, image_size)
    notes = [prep.ehr.notes[i] for i in prep.join.rows]
    encoded = tokenizer(
        notes,
        padding="max_length",
        truncation=True,
        max_length=max_note_tokens,
        return_tensors="np",
    )
    features = prep.ehr.features[prep.join.rows]
    present = np.stack(
        [
            image_ok,
            ehr_present(features, task),
            np.array([bool(t.strip()) for t in notes]),
        ],
        axis=1,
    ).astype(np.float32)
    tensors = {
        "image": torch.from_numpy(image),
        "ehr": torch.from_numpy(features),
        "note_ids": torch.from_numpy(np.asarray(encoded["input_ids"], np.int64)),
        "note_mask": torch.from_numpy(np.asarray(encoded["attention_mask"], np.int64)),
        "note_ngrams": torch.from_numpy(
            hash_note_ngrams(notes, note_ngram_buckets, max_note_ngrams)
        ),
        "labels": torch.from_numpy(prep.ehr.labels[prep.join.rows]),
        "label_known": torch.from_numpy(
            (~prep.ehr.label_null[prep.join.rows]).astype(np.float32)
        ),
        "present": torch.from_numpy(present),
    }
    return _split_site_data(site, prep, tensors, image_ok, task.labels)


def _check_matched(site: SiteConfig, join: Join) -> None:
    """DataError saying what to check when no EHR row can become an item."""
    if join.rows:
        return
    if not site.has_imaging:
        raise DataError(
            f"no EHR row has both a patient id and a study uid ({join.no_key} rows "
            "without)",
            hint="Check `[ehr] patient-id` and `[ehr] study-uid` in site.toml "
            "(`wardround site check` shows the EHR section).",
        )
    raise DataError(
        f"no EHR row matches a DICOM study ({join.ehr_studies} EHR studies, "
        f"{join.dicom_studies} DICOM studies)",
        hint="Check that `[ehr] study-uid` in site.toml names the column holding "
        "the DICOM StudyInstanceUID, and that data.dicom-dirs is right "
        "(`wardround site check` shows the join coverage).",
    )


def _matched_images(
    prep: PreparedSite, task: TaskConfig, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each joined row's decoded image (zeros without one) and whether it has one."""
    matched, ehr = prep.join.rows, prep.ehr
    position = {study: j for j, study in enumerate(prep.images)}
    size, channels = image_size, task.image_channels
    image = np.zeros((len(matched), channels, size, size), np.float32)
    image_ok = np.zeros(len(matched), bool)
    for k, i in enumerate(matched):
        uid = ehr.study_uids[i]
        j = position.get(uid) if uid is not None else None
        if j is not None and not np.isnan(prep.decoded[j]).any():
            image[k] = prep.decoded[j]
            image_ok[k] = True
    return image, image_ok


def _split_site_data(
    site: SiteConfig,
    prep: PreparedSite,
    tensors: dict[str, torch.Tensor],
    image_ok: np.ndarray,
    label_names: tuple[str, ...],
) -> SiteData:
    """Split the items per patient into train and validation, and count them."""
    ehr, join = prep.ehr, prep.join
    matched = join.rows
    patient_ids = [ehr.patient_ids[i] or "" for i in matched]
    in_val = split_patients(
        patient_ids, site.data.split_seed, site.data.validation_fraction
    )
    patients = patient_ordinals(patient_ids)
    val_idx = torch.from_numpy(np.flatnonzero(in_val))
    train_idx = torch.from_numpy(np.flatnonzero(~in_val))
    null_per_label = ehr.label_null[matched].sum(axis=0)
    # a label site.toml declares not recorded is unknown everywhere by design
    null_labels = sum(
        int(n)
        for name, n in zip(label_names, null_per_label, strict=True)
        if site.ehr.records(name)
    )
    with_image = np.array(join.with_image, bool)
    failed = with_image & ~image_ok
    n_errors = int(failed.sum())
    write_data_notes(
        site.cache_path,
        studies=len(matched),
        image_failures=Counter(
            prep.reasons.get(ehr.study_uids[i] or "", "unknown")
            for i, bad in zip(matched, failed, strict=True)
            if bad
        ),
    )
    if n_errors:
        _warn(
            "site %s: %d of %d images could not be decoded; kept without image",
            site.site.name,
            n_errors,
            len(matched),
        )
    if null_labels:
        _warn(
            "site %s: %d label cell(s) with no usable value are left out of the loss "
            "and of AUROC (%s); `wardround site check` lists them per label",
            site.site.name,
            null_labels,
            ", ".join(
                f"{name} {int(n)}"
                for name, n in zip(label_names, null_per_label, strict=True)
                if n and site.ehr.records(name)
            ),
        )
    logger.info(
        "site data: %d studies (%d train, %d validation) of %d patients (%d train), "
        "%d EHR rows without image, %d images without EHR row, %d duplicate EHR rows",
        len(matched),
        len(train_idx),
        len(val_idx),
        count_patients(patients),
        count_patients(patients[train_idx.numpy()]),
        join.ehr_studies - join.ehr_with_image,
        join.dicom_studies - join.dicom_with_ehr,
        join.duplicates,
    )
    return SiteData(
        train=TensorDictDataset(
            {k: v[train_idx] for k, v in tensors.items()}, patients[train_idx.numpy()]
        ),
        validation=TensorDictDataset(
            {k: v[val_idx] for k, v in tensors.items()}, patients[val_idx.numpy()]
        ),
        fingerprint=prep.fingerprint,
        num_studies=len(matched),
        num_unmatched_ehr=join.ehr_studies - join.ehr_with_image,
        num_unmatched_images=join.dicom_studies - join.dicom_with_ehr,
        num_privacy_units=count_patients(patients[train_idx.numpy()]),
        num_null_labels=null_labels,
        num_image_errors=n_errors,
        num_duplicate_ehr=join.duplicates,
        num_without_image=int((~with_image).sum()),
    )


def ehr_present(features: np.ndarray, task: TaskConfig) -> np.ndarray:
    """Per row: whether any EHR feature is known (a numeric value or a category)."""
    n_numeric = len(task.numeric)
    # any(axis=1) of a 2-D array is an array; numpy's stubs also allow a scalar
    present = cast(
        np.ndarray,
        (features[:, n_numeric : 2 * n_numeric] < 0.5).any(axis=1)
        if n_numeric
        else np.zeros(len(features), bool),
    )
    start = 2 * n_numeric
    for vocab in task.categorical.values():
        present |= features[:, start : start + len(vocab)].sum(axis=1) > 0
        start += len(vocab) + 1
    return present


def _fingerprint(
    images: dict[str, list[dict[str, Any]]], ehr: EncodedEhr, matched: list[int]
) -> str:
    """sha256 over the data a run uses: the joined rows and their studies' images.

    Studies no EHR row joins are left out, so a site that fetches only its EHR's
    studies from a PACS has the fingerprint of the same data read from a folder.
    """
    used = {ehr.study_uids[i] for i in matched}
    h = hashlib.sha256(
        index_fingerprint({k: v for k, v in images.items() if k in used}).encode()
    )
    for i in matched:
        h.update((ehr.patient_ids[i] or "").encode() + b"\x1f")
        h.update((ehr.study_uids[i] or "").encode() + b"\x1f")
        h.update(ehr.features[i].tobytes())
        h.update(ehr.labels[i].tobytes())
        if ehr.label_null[i].any():  # tells an unknown label from a 0; rows
            h.update(
                b"\x1dunknown" + ehr.label_null[i].tobytes()
            )  # without keep theirs
        h.update(ehr.notes[i].encode() + b"\x1e")
    return h.hexdigest()
