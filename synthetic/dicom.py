"""Write synthetic studies as valid DICOM Part 10 files with pydicom.

A density map in [0, 1] becomes stored pixel values the way each modality stores
them: CT as signed 16-bit with ``RescaleIntercept = -1024`` (so the modality LUT
gives Hounsfield units), CR and DX as unsigned 12/14-bit (some CR inverted,
``MONOCHROME1``), MR as unsigned 12-bit in arbitrary units. A site's scanner
scale, offset and noise are applied before storing. Files use Explicit VR Little
Endian and are written with ``enforce_file_format=True``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

SOP_CLASS = {
    "CT": CTImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "MR": MRImageStorage,
}

#: density -> Hounsfield units (air, lung, ground glass, soft tissue, lesion, bone)
_CT_DENSITY = np.array([-1.0, 0.0, 0.14, 0.4, 0.55, 0.72, 0.78, 0.82, 1.0, 2.0])
_CT_HU = np.array(
    [-1000.0, -1000.0, -850.0, -450.0, 20.0, 40.0, 50.0, 350.0, 700.0, 1000.0]
)

_UID_NAMESPACE = uuid.UUID("5b0f0f7e-7a0e-4d7c-9a55-3f6f2b0c9e11")


def make_uid(*parts: object) -> str:
    """Return a reproducible DICOM UID under the ``2.25.`` root (UUID5 of the parts)."""
    key = "/".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, key).int}"


@dataclass(frozen=True)
class Scanner:
    """How one site's scanners distort intensities."""

    scale: float = 1.0
    offset: float = 0.0
    noise: float = 0.03
    multi_window: bool = False
    cr_window: bool = True
    monochrome1_fraction: float = 0.0


@dataclass(frozen=True)
class Study:
    """The header facts of one single-image study."""

    patient_id: str
    patient_name: str
    sex: str
    birth_date: str
    age: int
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    study_date: str
    study_time: str
    modality: str
    body_part: str
    institution: str


@dataclass(frozen=True)
class Encoded:
    """Stored pixel values plus the tags that describe them."""

    pixels: np.ndarray
    photometric: str
    bits_stored: int
    rescale: tuple[float, float] | None
    window: tuple[list[float], list[float]] | None
    spacing: float


def encode_pixels(
    density: np.ndarray, modality: str, scanner: Scanner, rng: np.random.Generator
) -> Encoded:
    """Turn a density map into stored values for ``modality`` at one site."""
    d = density * scanner.scale + scanner.offset
    d = d + rng.normal(0.0, scanner.noise, density.shape)
    if modality == "CT":
        hu = np.interp(d, _CT_DENSITY, _CT_HU)
        stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.int16)
        if scanner.multi_window:
            window = ([-600.0, 40.0], [1500.0, 400.0])
        else:
            window = ([-600.0], [1500.0])
        return Encoded(stored, "MONOCHROME2", 16, (1.0, -1024.0), window, 2.7)
    if modality == "CR":
        values = np.clip(np.rint(300.0 + 3400.0 * d), 0, 4095)
        photometric = "MONOCHROME2"
        center = 300.0 + 3400.0 * (0.45 * scanner.scale + scanner.offset)
        if rng.random() < scanner.monochrome1_fraction:
            values, center, photometric = 4095 - values, 4095 - center, "MONOCHROME1"
        window = ([round(center)], [3400.0 * scanner.scale * 1.1])
        return Encoded(
            values.astype(np.uint16),
            photometric,
            12,
            None,
            window if scanner.cr_window else None,
            3.2,
        )
    if modality == "DX":
        values = np.clip(np.rint(1000.0 + 12000.0 * d), 0, 16383).astype(np.uint16)
        center = 1000.0 + 12000.0 * (0.45 * scanner.scale + scanner.offset)
        window = ([round(center)], [12000.0 * scanner.scale * 1.1])
        return Encoded(values, "MONOCHROME2", 14, (1.0, 0.0), window, 3.0)
    if modality == "MR":
        values = np.clip(np.rint(40.0 + 1500.0 * d), 0, 4095).astype(np.uint16)
        return Encoded(values, "MONOCHROME2", 12, None, None, 3.1)
    raise ValueError(f"unknown modality {modality!r}; use one of {sorted(SOP_CLASS)}")


def build_dataset(study: Study, enc: Encoded) -> Dataset:
    """Assemble the dataset (file meta included) for one image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[study.modality]
    meta.MediaStorageSOPInstanceUID = UID(study.sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] + (
        ["AXIAL"] if study.modality == "CT" else []
    )
    ds.SOPClassUID = SOP_CLASS[study.modality]
    ds.SOPInstanceUID = study.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = study.modality
    ds.Manufacturer = "SYNTH"
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StudyDescription = f"{study.modality} {study.body_part}"
    ds.SeriesDescription = (
        f"{study.body_part} {'PA' if study.modality in ('CR', 'DX') else ''}".strip()
    )
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = f"{min(study.age, 999):03d}Y"
    ds.BodyPartExamined = study.body_part
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uid
    ds.StudyID = study.accession[-6:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if study.modality == "CT":
        ds.FrameOfReferenceUID = make_uid(study.study_uid, "frame")
        ds.ImagePositionPatient = [-172.8, -172.8, 0.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 5.0
        ds.KVP = 120
    elif study.modality in ("CR", "DX"):
        ds.PatientOrientation = ["L", "F"]
        ds.ViewPosition = "PA"
        ds.KVP = 110
        ds.ImagerPixelSpacing = [enc.spacing, enc.spacing]
    else:
        ds.MagneticFieldStrength = 1.5
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"

    rows, cols = enc.pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = enc.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [enc.spacing, enc.spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = 1 if enc.pixels.dtype == np.int16 else 0
    if enc.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = enc.rescale
        ds.RescaleType = "HU" if study.modality == "CT" else "US"
    if enc.window is not None:
        center, width = enc.window
        ds.WindowCenter = center if len(center) > 1 else center[0]
        ds.WindowWidth = width if len(width) > 1 else width[0]
    ds.PixelData = enc.pixels.astype(enc.pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def write_study(path: Path, study: Study, enc: Encoded) -> None:
    """Write one study (one series, one image) as a DICOM file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    build_dataset(study, enc).save_as(path, enforce_file_format=True)
