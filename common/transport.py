"""Half-precision transport of a plain round's packed delta (``federation.transport-dtype``).

A delta is float32 at the site and at the coordinator; on the wire a plain round may
send it as float16 or bfloat16, half the bytes. float16 keeps 11 significant bits
and overflows past 65,504; bfloat16 keeps 8 bits and float32's range. numpy has no
bfloat16, so a bfloat16 vector travels as its uint16 bit patterns (round to nearest,
ties to even), which :func:`decode` widens back. Under SecAgg+ the delta is
quantized to integers by the protocol itself, so the option applies to plain rounds
only (the config refuses the combination).

Pure: no I/O, no Flower.
"""

from __future__ import annotations

import numpy as np

from .config.enums import TransportDtype

WIRE_DTYPES: dict[TransportDtype, np.dtype] = {
    TransportDtype.FLOAT32: np.dtype(np.float32),
    TransportDtype.FLOAT16: np.dtype(np.float16),
    TransportDtype.BFLOAT16: np.dtype(np.uint16),
}
"""The numpy dtype each transport dtype has on the wire."""


def encode(vector: np.ndarray, dtype: TransportDtype) -> np.ndarray:
    """The float32 ``vector`` as it travels in ``dtype``."""
    values = np.ascontiguousarray(vector, dtype=np.float32)
    if dtype is TransportDtype.FLOAT32:
        return values
    if dtype is TransportDtype.FLOAT16:
        with np.errstate(over="ignore"):  # overflow becomes inf: the guard refuses it
            return values.astype(np.float16)
    bits = values.view(np.uint32)
    # Round to nearest, ties to even, on the 16 bits that are dropped; NaN stays NaN.
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    nan = np.isnan(values)
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def decode(vector: np.ndarray, dtype: TransportDtype) -> np.ndarray:
    """The float32 values of a vector that travelled in ``dtype``."""
    if dtype is TransportDtype.BFLOAT16:
        widened = np.asarray(vector, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
        return widened.view(np.float32)
    return np.asarray(vector, dtype=np.float32)


def relative_error(vector: np.ndarray, dtype: TransportDtype) -> float:
    """‖decode(encode(v)) − v‖₂ / ‖v‖₂: what the transport costs this vector."""
    values = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(values))
    if norm == 0.0:
        return 0.0
    back = decode(encode(vector, dtype), dtype).astype(np.float64)
    return float(np.linalg.norm(back - values)) / norm
