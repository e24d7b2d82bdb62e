"""DICOM pixels to a model-ready image: pure functions, one step each.

``frames_to_unit`` = decode → frames ``[F, H, W(, 3)]`` → colour to luminance
(palette LUT, RGB; YBR is converted to RGB by pydicom) → modality LUT (e.g. HU)
→ window (the file's own centre/width, else a preset by modality and body part,
else the image's own range) → invert ``MONOCHROME1`` → values in [0, 1].
``combine_slices`` turns frames (or the slices of a series) into ``C`` channels
(middle slice, max-intensity projection, or evenly spaced slices), and
``resize_to_square`` keeps the physical aspect ratio (``PixelSpacing``) and pads.
``apply_voi_lut`` is not used: it does not return [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut

from ..common.config import SliceMode
from ..common.errors import DataError
from .decode import (
    DISPLAY_ERROR,
    SERIES_SHAPES,
    DecodeFailure,
    decode_pixels,
    read_dataset,
)

#: (center, width) for CT when the file declares no window and no preset fits
CT_DEFAULT_WINDOW = (-400.0, 1600.0)

#: (modality, body part) -> (center, width); body part None: any body part.
#: Used only when the file declares no window of its own.
WINDOW_PRESETS: dict[tuple[str, str | None], tuple[float, float]] = {
    ("CT", None): CT_DEFAULT_WINDOW,
    ("CT", "CHEST"): CT_DEFAULT_WINDOW,  # lung and mediastinum together
    ("CT", "LUNG"): (-600.0, 1500.0),
    ("CT", "HEAD"): (40.0, 80.0),
    ("CT", "BRAIN"): (40.0, 80.0),
    ("CT", "NECK"): (40.0, 350.0),
    ("CT", "ABDOMEN"): (50.0, 400.0),
    ("CT", "PELVIS"): (50.0, 400.0),
    ("CT", "LIVER"): (60.0, 160.0),
    ("CT", "SPINE"): (400.0, 1800.0),
    ("CT", "CSPINE"): (400.0, 1800.0),
    ("CT", "LSPINE"): (400.0, 1800.0),
    ("CT", "EXTREMITY"): (400.0, 1800.0),
    ("PT", None): (2.5, 5.0),  # SUV-like scale after the modality LUT
}


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
    if not np.isfinite(low) or not np.isfinite(high) or high - low <= 0:
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
    try:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    except (TypeError, ValueError):
        return None
    if center is None or width is None or width <= 0:
        return None
    return center, width


def preset_window(
    modality: str | None,
    body_part: str | None,
    presets: dict[tuple[str, str | None], tuple[float, float]] | None = None,
) -> tuple[float, float] | None:
    """The preset window for a modality and body part (else the modality's)."""
    table = WINDOW_PRESETS if presets is None else presets
    mod = (modality or "").strip().upper()
    part = (body_part or "").strip().upper() or None
    return table.get((mod, part)) or table.get((mod, None))


def to_unit(
    values: np.ndarray,
    ds: pydicom.Dataset,
    presets: dict[tuple[str, str | None], tuple[float, float]] | None = None,
) -> np.ndarray:
    """Window modality-LUT output to [0, 1]: file window, else preset, else range."""
    chosen = declared_window(ds) or preset_window(
        str(ds.get("Modality", "")), str(ds.get("BodyPartExamined", "")), presets
    )
    if chosen is not None:
        return window(values, *chosen)
    return min_max(values)


def photometric(ds: pydicom.Dataset) -> str:
    """The photometric interpretation, upper case (MONOCHROME2 when absent)."""
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()


def is_colour(ds: pydicom.Dataset) -> bool:
    """Whether the image is stored as colour (no modality LUT, no inversion)."""
    return int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric(ds) == (
        "PALETTE COLOR"
    )


def as_frames(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Give pixels a leading frame axis: ``[F, H, W]`` or ``[F, H, W, 3]``."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    single = pixels.ndim == (3 if colour else 2)
    if frames <= 1 or single:
        return pixels[None]
    return pixels


def to_grey(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Colour (RGB, YBR converted by pydicom, PALETTE COLOR) to luminance."""
    if photometric(ds) == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim >= 3 and pixels.shape[-1] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return pixels.astype(np.float32) @ weights
    return pixels.astype(np.float32)


def frames_to_unit(
    ds: pydicom.Dataset,
    pixels: np.ndarray,
    presets: dict[tuple[str, str | None], tuple[float, float]] | None = None,
) -> np.ndarray:
    """Decoded pixels → float32 ``[F, H, W]`` in [0, 1], display-ready.

    Raises
    ------
    DecodeFailure
        :data:`~.decode.DISPLAY_ERROR` when the file's colour table, rescale or
        window cannot be applied, or gives values that are not finite.
    """
    try:
        unit = _frames_to_unit(ds, pixels, presets)
    except DecodeFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - any header the decoder accepted
        raise DecodeFailure(DISPLAY_ERROR) from exc
    if not np.isfinite(unit).all():
        raise DecodeFailure(DISPLAY_ERROR)
    return unit


def _frames_to_unit(
    ds: pydicom.Dataset,
    pixels: np.ndarray,
    presets: dict[tuple[str, str | None], tuple[float, float]] | None,
) -> np.ndarray:
    frames = as_frames(pixels, ds)
    if is_colour(ds):
        return min_max(to_grey(frames, ds))
    if _has_functional_groups(ds):
        return np.stack(
            [
                _grey_to_unit(frame[None], frame_view(ds, index), presets)[0]
                for index, frame in enumerate(frames)
            ]
        )
    return _grey_to_unit(frames, ds, presets)


def _grey_to_unit(
    frames: np.ndarray,
    ds: pydicom.Dataset,
    presets: dict[tuple[str, str | None], tuple[float, float]] | None,
) -> np.ndarray:
    values = np.asarray(apply_modality_lut(frames, ds), dtype=np.float32)
    unit = to_unit(values, ds, presets)
    if photometric(ds) == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32, copy=False)


_FRAME_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")
"""What an Enhanced multi-frame image keeps per frame or shared, in its functional
groups (Pixel Value Transformation, Frame VOI LUT), rather than at the top level."""


def _has_functional_groups(ds: pydicom.Dataset) -> bool:
    return bool(
        ds.get("SharedFunctionalGroupsSequence")
        or ds.get("PerFrameFunctionalGroupsSequence")
    )


def frame_view(ds: pydicom.Dataset, index: int) -> pydicom.Dataset:
    """The display attributes that hold for frame ``index``.

    The data set's own, then those of its shared functional groups, then those of
    the frame's own groups, each overriding the one before (PS3.3 C.7.6.16).
    """
    view = pydicom.Dataset()
    for keyword in (*_FRAME_KEYWORDS, "Modality", "BodyPartExamined"):
        if keyword in ds:
            setattr(view, keyword, ds.get(keyword))
    view.PhotometricInterpretation = photometric(ds)
    if "ModalityLUTSequence" in ds:
        view.ModalityLUTSequence = ds.ModalityLUTSequence
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    groups = [*(ds.get("SharedFunctionalGroupsSequence") or [])[:1]]
    if index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for element in group:
            if element.VR != "SQ" or not element.value:
                continue
            for keyword in _FRAME_KEYWORDS:
                if keyword in element.value[0]:
                    setattr(view, keyword, element.value[0].get(keyword))
    return view


def pick_indices(n: int, mode: SliceMode, channels: int = 1) -> list[int]:
    """Which of ``n`` slices a mode uses.

    Middle: ``[n // 2]``; MIP: all; channels: the centres of ``channels`` equal
    parts (the identity when ``n == channels``, repeats when ``n < channels``).
    """
    if mode is SliceMode.MIP:
        return list(range(n))
    if mode is SliceMode.CHANNELS:
        return [min(n - 1, int((i + 0.5) * n / channels)) for i in range(channels)]
    return [n // 2]


def combine_slices(
    frames: np.ndarray, mode: SliceMode, channels: int = 1
) -> np.ndarray:
    """``[F, H, W]`` → ``[C, H, W]``: middle slice, MIP, or slices as channels.

    For ``channels`` mode with fewer slices than channels, slices repeat.
    """
    if mode is SliceMode.MIP:
        return frames.max(axis=0, keepdims=True)
    if mode is SliceMode.CHANNELS:
        return frames[pick_indices(len(frames), mode, channels)]
    return frames[len(frames) // 2][None]


def pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float]:
    """(row, column) spacing in mm; (1, 1) when undeclared or invalid."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError, KeyError):
            continue
        if row > 0 and col > 0:
            return row, col
    return 1.0, 1.0


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, anti-aliased resize of a 2-D image to ``size x size``."""
    return resize_to_square(image[None], size)[0]


def resize_to_square(
    image: np.ndarray, size: int, spacing: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """``[C, H, W]`` → ``[C, S, S]`` keeping the physical aspect ratio, zero-padded.

    The longer physical side fills ``size``; a square image with square pixels is
    a plain resize.
    """
    import torch

    _, rows, cols = image.shape
    height, width = rows * spacing[0], cols * spacing[1]
    scale = size / max(height, width)
    out_h = max(1, min(size, int(round(height * scale))))
    out_w = max(1, min(size, int(round(width * scale))))
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    resized = torch.nn.functional.interpolate(
        tensor,
        size=(out_h, out_w),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0].numpy()
    out = np.zeros((image.shape[0], size, size), np.float32)
    top, left = (size - out_h) // 2, (size - out_w) // 2
    out[:, top : top + out_h, left : left + out_w] = resized
    return np.clip(out, 0.0, 1.0)


def dataset_to_image(
    ds: pydicom.Dataset,
    size: int,
    mode: SliceMode = SliceMode.MIDDLE,
    channels: int = 1,
) -> np.ndarray:
    """Decoded dataset → float32 ``[S, S]`` (one channel) or ``[C, S, S]``."""
    unit = frames_to_unit(ds, decode_pixels(ds))
    image = resize_to_square(
        combine_slices(unit, mode, channels), size, pixel_spacing(ds)
    )
    return image[0] if channels == 1 and mode is not SliceMode.CHANNELS else image


def load_unit_frames(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Read one file → (``[F, H, W]`` in [0, 1], pixel spacing).

    Raises
    ------
    DecodeFailure
        With a fixed-vocabulary reason.
    """
    ds = read_dataset(Path(path))
    return frames_to_unit(ds, decode_pixels(ds)), pixel_spacing(ds)


def load_study_image(
    paths: list[Path],
    size: int,
    mode: SliceMode = SliceMode.MIDDLE,
    channels: int = 1,
) -> np.ndarray:
    """One image input ``[C, S, S]`` from a file (frames) or a series (one per slice).

    ``paths`` are in slice order. With several files, only the slices the mode
    needs are decoded. Raises :class:`DecodeFailure` when a needed file fails.
    """
    if len(paths) == 1:
        frames, spacing = load_unit_frames(paths[0])
        return resize_to_square(combine_slices(frames, mode, channels), size, spacing)
    decoded = [
        load_unit_frames(paths[i]) for i in pick_indices(len(paths), mode, channels)
    ]
    shape = decoded[0][0].shape[1:]
    if any(f.shape[1:] != shape for f, _ in decoded):
        raise DecodeFailure(SERIES_SHAPES)
    picked = np.stack([f[len(f) // 2] for f, _ in decoded])  # [k, H, W]
    if mode is SliceMode.MIP:
        picked = picked.max(axis=0, keepdims=True)
    return resize_to_square(picked, size, decoded[0][1])


def load_image(path: Path, size: int) -> np.ndarray:
    """Read a DICOM file; return float32 ``[size, size]`` in [0, 1] (middle frame).

    Raises :class:`DataError` naming the reason when the pixels cannot be used
    (e.g. a compressed transfer syntax without its codec installed).
    """
    try:
        return load_study_image([Path(path)], size)[0]
    except DecodeFailure as exc:
        raise DataError(
            f"cannot use the pixels of {path}: {exc.reason}",
            hint="Compressed files need `pip install wardround[codecs]`; "
            "`wardround site check` lists every file that cannot be used.",
        ) from exc
