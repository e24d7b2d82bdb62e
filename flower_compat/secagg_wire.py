"""A lossless, narrower encoding of SecAgg+'s masked vectors for the wire.

Flower's SecAgg+ mod sends each masked vector as int64 although every entry lies
in ``[0, modulus_range)`` with ``modulus_range <= 2**32``: as uint32 the upload
halves. The site narrows after Flower's mod has masked the vector; the coordinator
widens back to int64 before Flower's workflow sums the vectors. Nothing else in
the protocol changes.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from flwr.app import Message
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from ..common.npy import npy_bytes, npy_view

_LIMIT = 2**32


def _masked(msg: Message) -> list[bytes] | None:
    if msg.has_error() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return None
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    value = configs.get(Key.MASKED_PARAMETERS)
    # Flower's mod puts the masked vectors there as a list of serialised arrays.
    return cast(list[bytes], value) if isinstance(value, list) else None


def narrow_masked_vectors(msg: Message) -> Message:
    """Site side: re-encode the masked vectors as uint32 (values checked)."""
    arrays = _masked(msg)
    if arrays is None:
        return msg
    narrowed = []
    for data in arrays:
        array = bytes_to_ndarray(data)
        if array.size and (array.min() < 0 or array.max() >= _LIMIT):
            raise ValueError("a masked vector entry lies outside [0, 2**32)")
        narrowed.append(ndarray_to_bytes(array.astype(np.uint32)))
    msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = narrowed
    return msg


def widen_masked_vectors(msg: Message) -> Message:
    """Coordinator side: back to int64, as Flower's workflow expects."""
    arrays = _masked(msg)
    if arrays is None:
        return msg
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    widened = []
    for index, data in enumerate(arrays):
        widened.append(_widened_npy(data))
        arrays[index] = b""  # the narrow bytes go as soon as their wide copy exists
    configs[Key.MASKED_PARAMETERS] = widened
    return msg


def _widened_npy(data: bytes) -> bytes:
    """The .npy bytes of a serialised array as int64.

    Read in place and written with one copy (:mod:`wardround.common.npy`):
    ``ndarray_to_bytes(bytes_to_ndarray(data).astype(np.int64))`` held five copies
    of a vector at once, this holds the widened array and its bytes.
    """
    return npy_bytes(npy_view(data).astype("<i8"))
