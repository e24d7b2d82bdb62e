"""numpy's .npy format read as a view and written with one copy.

Every adapter crosses the wire as the .npy bytes ``np.save`` writes (Flower's
``Array`` and legacy ``Parameters`` both hold them). ``np.load`` reads such bytes
into a new array and ``np.save`` writes through a growing buffer that is copied
again at the end: with a 160 MB adapter, each read or write held one or two extra
copies. :func:`read_npy` reads the same format as a view of the bytes, and
:func:`npy_bytes` writes exactly what ``np.save`` writes, copying the values once.

Only what ``np.load(..., allow_pickle=False)`` accepts is read: a plain dtype,
never Python objects. Only versions 1.0 and 2.0 of the format, the ones
``np.save`` writes for such arrays, are read.

Pure: no I/O, no Flower.
"""

from __future__ import annotations

import io

import numpy as np

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def read_npy(data: bytes, *, trailing: bool = False) -> tuple[np.ndarray, int]:
    """The array in ``data`` as a read-only view, and where its values start.

    ``trailing``: accept bytes after the values, as ``np.load`` does (a caller
    that refuses them says so in its own words).

    Raises
    ------
    ValueError
        ``data`` is not a .npy array of a plain dtype in version 1.0 or 2.0, or
        holds fewer bytes of values than its header states (or more, unless
        ``trailing``).
    """
    stream = io.BytesIO(data)  # shares the bytes until written to: no copy
    version = np.lib.format.read_magic(stream)
    reader = _HEADER_READERS.get(version)
    if reader is None:
        raise ValueError(f".npy format version {version}; 1.0 or 2.0 is read")
    try:
        shape, fortran_order, dtype = reader(stream)
    except (TypeError, OverflowError) as error:  # a header numpy parses, nonsense
        raise ValueError(f"the .npy header is not an array's: {error}") from error
    if dtype.hasobject:
        raise ValueError("an array of Python objects would need pickle")
    try:
        count = int(np.prod(shape, dtype=np.int64))
    except (TypeError, OverflowError) as error:
        raise ValueError(f"the .npy header's shape {shape!r} is not one") from error
    offset = stream.tell()
    held = len(data) - offset
    if held < count * dtype.itemsize or (
        held > count * dtype.itemsize and not trailing
    ):
        raise ValueError(
            f"the array's header states {count} values of {dtype.itemsize} B, its "
            f"data is {held} B"
        )
    if count < 0:
        raise ValueError(f"the .npy header's shape {shape!r} is not one")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if fortran_order:
        return flat.reshape(shape[::-1]).transpose(), offset
    return flat.reshape(shape), offset


def npy_view(data: bytes) -> np.ndarray:
    """The array in ``data`` as a read-only view (see :func:`read_npy`)."""
    return read_npy(data)[0]


def npy_header(array: np.ndarray) -> bytes:
    """The bytes ``np.save(..., allow_pickle=False)`` writes before ``array``'s values."""
    if array.dtype.hasobject:
        raise ValueError("an array of Python objects would need pickle")
    fields = np.lib.format.header_data_from_array_1_0(array)
    stream = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(stream, fields)
    except ValueError:  # a header beyond 64 KiB: np.save moves to version 2.0
        stream = io.BytesIO()
        np.lib.format.write_array_header_2_0(stream, fields)
    return stream.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """What ``np.save(..., allow_pickle=False)`` writes for ``array``, copied once.

    For every array ``np.save`` writes in format 1.0 or 2.0; field names beyond
    latin-1 (format 3.0) raise ``UnicodeEncodeError``.
    """
    fortran = np.lib.format.header_data_from_array_1_0(array)["fortran_order"]
    values = np.ascontiguousarray(array.T if fortran else array)
    # As raw bytes: the buffer protocol knows no datetime or structured dtypes.
    return b"".join((npy_header(array), values.reshape(-1).view(np.uint8).data))
