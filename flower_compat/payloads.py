"""Reading a Flower message's arrays without a copy, and freeing them once read.

Flower's ``Array.numpy()`` loads the array's .npy bytes into a new ndarray, a
second copy of every delta the coordinator reads; :func:`array_view` reads the
same format (no pickle) as a view of the bytes instead.

Flower 1.41's records keep a bound method of themselves (``RecordDict`` checks the
records put into it with its own ``check_value``), so every message's content sits
in a reference cycle. Its arrays' bytes are then freed only when Python's cyclic
collector runs, which in a ServerApp that allocates few objects can be rounds later:
with a 160 MB adapter, every site's delta and every pushed global adapter stayed
alive well past the round that used them. Emptying the array records drops the
bytes at once; the message shells are left to the collector.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, Message

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def array_view(array: Array) -> np.ndarray:
    """The values of a Flower ``Array`` as a read-only view of its bytes.

    What ``Array.numpy()`` accepts, this accepts (see :func:`npy_view`).
    """
    return npy_view(array.data)


def npy_view(data: bytes) -> np.ndarray:
    """The values of an array in numpy's .npy format, as a read-only view of ``data``.

    What ``np.load(..., allow_pickle=False)`` accepts, this accepts: a plain dtype,
    no Python objects. Versions other than 1.0 and 2.0 (numpy writes 1.0) are
    loaded by numpy, with a copy.

    Raises
    ------
    ValueError
        The bytes are not such an array, or hold more or fewer values than their
        header states.
    """
    stream = io.BytesIO(data)  # shares the bytes until written to: no copy
    version = np.lib.format.read_magic(stream)
    reader = _HEADER_READERS.get(version)
    if reader is None:
        return np.load(io.BytesIO(data), allow_pickle=False)
    shape, fortran_order, dtype = reader(stream)
    if dtype.hasobject:
        raise ValueError("an array of Python objects would need pickle")
    count = int(np.prod(shape, dtype=np.int64))
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"the array's header states {count} values of {dtype.itemsize} B, its "
            f"data is {len(data) - offset} B"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if fortran_order:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def release_arrays(messages: Iterable[Message]) -> None:
    """Empty every array record of these messages (their other records stay)."""
    for msg in messages:
        if msg.has_content():
            for record in msg.content.array_records.values():
                record.clear()
