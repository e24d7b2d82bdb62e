"""DICOM pixels to a model-ready image: pure functions, one step each.

``load_image`` = read → pick the middle frame → grey level → modality LUT (e.g. HU)
→ window (the file's own centre/width, else a default by modality) → invert
``MONOCHROME1`` → resize → clip to [0, 1]. ``apply_voi_lut`` is not used: it does
not return [0, 1]; the window here is the plain linear one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut

from ...common.errors import DataError

#: (center, width) for CT when the file declares no window: lung to soft tissue
CT_DEFAULT_WINDOW = (-400.0, 1600.0)


def window(array: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window: ``center - width/2`` → 0, ``center + width/2`` → 1, clipped."""
    width = max(float(width), 1e-6)
    low = float(center) - width / 2.0
    out = (np.asarray(array, dtype=np.float32) - low) / width
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def min_max(array: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own range (a constant array gives zeros)."""
    array = np.asarray(array, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    if high - low <= 0:
        return np.zeros_like(array, dtype=np.float32)
    return (array - low) / (high - low)


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def declared_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """Return the file's (WindowCenter, WindowWidth), first value if multi-valued."""
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return center, width


def to_unit(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Window modality-LUT output to [0, 1] (declared window, else by modality)."""
    declared = declared_window(ds)
    if declared is not None:
        return window(values, *declared)
    if str(ds.get("Modality", "")).upper() == "CT":
        return window(values, *CT_DEFAULT_WINDOW)
    return min_max(values)


def select_frame(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Pick the middle frame of a multi-frame image, else the image itself."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return pixels[frames // 2]
    return pixels


def to_grey(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Colour (RGB, YBR converted by pydicom, PALETTE COLOR) to luminance."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return pixels.astype(np.float32) @ weights
    return pixels


def is_colour(ds: pydicom.Dataset) -> bool:
    """Whether the image is stored as colour (no modality LUT, no inversion)."""
    return (
        int(ds.get("SamplesPerPixel", 1) or 1) > 1
        or str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR"
    )


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, anti-aliased resize of a 2-D image to ``size x size``."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(
        tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out[0, 0].numpy()


def dataset_to_image(ds: pydicom.Dataset, size: int) -> np.ndarray:
    """Convert a decoded dataset to float32 ``[size, size]`` in [0, 1]."""
    pixels = select_frame(ds.pixel_array, ds)
    if is_colour(ds):
        unit = min_max(to_grey(pixels, ds))
    else:
        values = apply_modality_lut(pixels, ds)
        unit = to_unit(values, ds)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            unit = 1.0 - unit
    return np.clip(resize(unit, size), 0.0, 1.0).astype(np.float32, copy=False)


def load_image(path: Path, size: int) -> np.ndarray:
    """Read a DICOM file; return float32 ``[size, size]`` in [0, 1].

    Raises :class:`DataError` when the pixels cannot be decoded (e.g. a compressed
    transfer syntax without its codec installed).
    """
    try:
        ds = pydicom.dcmread(path)
        return dataset_to_image(ds, size)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot decode the pixels of {path}: {type(exc).__name__}: {exc}",
            hint="For JPEG / JPEG 2000 / JPEG-LS files install pylibjpeg with "
            "pylibjpeg-libjpeg and pylibjpeg-openjpeg (or python-gdcm).",
        ) from exc
