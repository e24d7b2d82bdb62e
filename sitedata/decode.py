"""Read DICOM pixels or say, in fixed words, why they cannot be read.

Every failure becomes a :class:`DecodeFailure` whose ``reason`` is taken from a
fixed vocabulary (plus the transfer syntax's *name* from pydicom's UID
dictionary): never text from the file's header, so reasons may be logged, counted
and shown without leaking anything. A compressed file whose codec is not
installed is reported as :data:`NEEDS_CODEC`, not as corrupt.

pydicom decodes uncompressed (little/big endian), deflated and RLE natively;
JPEG, JPEG-LS, JPEG 2000 and HTJ2K need the ``wardround[codecs]`` extra
(pylibjpeg + plugins, pyjpegls, python-gdcm). Pillow, when installed, also
decodes JPEG baseline and JPEG 2000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

OK = "ok"
NOT_DICOM = "not DICOM (no DICOM header)"
UNREADABLE = "unreadable DICOM header"
NO_PERMISSION = "no read permission for the account running wardround"
FOLDER_NO_PERMISSION = "folder the account running wardround cannot list"
PERMISSION_STATUSES = (NO_PERMISSION, FOLDER_NO_PERMISSION)
NO_PIXELS = "not an image (no pixel data)"
NO_TRANSFER_SYNTAX = "no transfer syntax in the file meta"
UNSUPPORTED = "unsupported transfer syntax"
NEEDS_CODEC = "compressed; no codec installed: install wardround[codecs]"
TRUNCATED = "truncated pixel data"
MISSING_ATTRIBUTE = "image attributes missing or invalid"
CODEC_ERROR = "codec could not decode the pixel data"
DECODE_ERROR = "pixel data could not be decoded"
SERIES_SHAPES = "slices of the series differ in size"
DISPLAY_ERROR = "colour table, rescale or window missing or invalid"
BROKEN_LINK = "broken link (its target is missing)"

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DecodeFailure(Exception):
    """A file whose pixels cannot be used; ``reason`` is fixed vocabulary."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def transfer_syntax_name(uid: str | None) -> str:
    """The transfer syntax's dictionary name, ``"unknown"`` for private ones."""
    if not uid:
        return "none"
    name = UID(str(uid)).name
    return name if UID(str(uid)).is_transfer_syntax else "unknown"


def codec_status(uid: str | None) -> str:
    """:data:`OK` when a decoder for ``uid`` is installed, else the reason."""
    if not uid:
        return NO_TRANSFER_SYNTAX
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(UID(str(uid)))
    except NotImplementedError:
        return UNSUPPORTED
    if decoder.is_native or decoder.is_available:
        return OK
    return NEEDS_CODEC


def read_dataset(path: Path, *, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """Read a DICOM file, also one without the Part 10 preamble/meta.

    Raises
    ------
    DecodeFailure
        :data:`NOT_DICOM`, :data:`UNREADABLE` or :data:`NO_PERMISSION`.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except PermissionError as exc:
        raise DecodeFailure(NO_PERMISSION) from exc
    except Exception as exc:  # noqa: BLE001 - every unreadable file is recorded
        raise DecodeFailure(UNREADABLE) from exc
    try:  # raw data sets without a preamble (common in old PACS exports)
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        if "SOPClassUID" not in ds and "StudyInstanceUID" not in ds:
            raise DecodeFailure(NOT_DICOM)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = _guess_raw_syntax(ds)
        return ds
    except DecodeFailure:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DecodeFailure(NOT_DICOM) from exc


def _guess_raw_syntax(ds: pydicom.Dataset) -> UID:
    little = getattr(ds, "is_little_endian", None)
    implicit = getattr(ds, "is_implicit_VR", None)
    if little is None:
        little = getattr(ds, "original_encoding", (None, True))[1]
    if implicit is None:
        implicit = getattr(ds, "original_encoding", (True, None))[0]
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    if little:
        return pydicom.uid.ExplicitVRLittleEndian
    return pydicom.uid.ExplicitVRBigEndian


def has_pixels(ds: pydicom.Dataset) -> bool:
    """Whether the data set holds a pixel data element."""
    return any(k in ds for k in _PIXEL_KEYWORDS)


def decode_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the pixel data; colour comes back as RGB (YBR converted by pydicom).

    Raises
    ------
    DecodeFailure
        With a reason from this module's vocabulary.
    """
    if not has_pixels(ds):
        raise DecodeFailure(NO_PIXELS)
    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    status = codec_status(uid)
    if status != OK:
        raise DecodeFailure(status)
    try:
        return ds.pixel_array
    except DecodeFailure:
        raise
    except (AttributeError, KeyError, TypeError) as exc:
        raise DecodeFailure(MISSING_ATTRIBUTE) from exc
    except ValueError as exc:
        text = str(exc)
        if "less than expected" in text or "truncat" in text.lower():
            raise DecodeFailure(TRUNCATED) from exc
        if "invalid literal" in text or "element" in text:
            raise DecodeFailure(MISSING_ATTRIBUTE) from exc
        raise DecodeFailure(DECODE_ERROR) from exc
    except RuntimeError as exc:
        raise DecodeFailure(CODEC_ERROR) from exc
    except Exception as exc:  # noqa: BLE001 - any failure is a reason, never a crash
        raise DecodeFailure(DECODE_ERROR) from exc
