"""numpy's .npy format, read as a view and written with one copy, is np.save's own."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays, scalar_dtypes

from wardround.common.npy import npy_bytes, npy_header, npy_view, read_npy


def _saved(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


any_array = arrays(
    scalar_dtypes(), array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
)


@settings(max_examples=150, deadline=None)
@given(any_array, st.sampled_from(["C", "F", "strided"]))
def test_written_bytes_are_what_np_save_writes(array, layout):
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim:
        array = array[..., ::2]

    assert npy_bytes(array) == _saved(array)
    assert _saved(array).startswith(npy_header(array))


@settings(max_examples=150, deadline=None)
@given(any_array, st.booleans())
def test_read_view_is_what_np_load_reads(array, fortran):
    if fortran:
        array = np.asfortranarray(array)
    data = _saved(array)

    view, offset = read_npy(data)

    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    assert view.dtype == loaded.dtype and view.shape == loaded.shape
    assert view.tobytes() == loaded.tobytes()  # bit for bit, NaN and NaT included
    assert (
        data[offset:]
        == np.ascontiguousarray(view.T if fortran and view.ndim > 1 else view).tobytes()
    )
    assert not view.flags.writeable and not view.flags.owndata


def test_lengths_other_than_the_headers_are_refused_unless_trailing_is_allowed():
    data = _saved(np.arange(4, dtype=np.float32))

    with pytest.raises(ValueError, match="header states 4 values"):
        read_npy(data[:-1])
    with pytest.raises(ValueError, match="header states 4 values"):
        read_npy(data + b"hidden", trailing=False)
    with pytest.raises(ValueError, match="header states 4 values"):
        read_npy(data[:-1], trailing=True)
    view, _ = read_npy(data + b"hidden", trailing=True)
    assert view.tolist() == [0, 1, 2, 3]


def test_objects_and_other_format_versions_are_refused():
    # The header of an object array, as np.save writes it before the pickled values.
    objects = _with_header(
        "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", b"\x80\x04."
    )
    with pytest.raises(ValueError, match="pickle"):
        npy_view(objects)
    with pytest.raises(ValueError, match="pickle"):
        npy_header(np.array([None], dtype=object))
    version_3 = bytearray(_saved(np.arange(3)))
    version_3[6] = 3
    with pytest.raises(ValueError, match="version"):
        npy_view(bytes(version_3))
    for garbage in (b"\x93NUMPY", b"not an array at all"):
        with pytest.raises(ValueError):
            npy_view(garbage)


def _with_header(text: str, values: bytes = b"") -> bytes:
    header = text.encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + values


@pytest.mark.parametrize(
    "shape",
    ["(2**64,)", "(-1,)", "(1.5,)"],
    ids=["huge", "negative", "float"],
)
def test_nonsense_shapes_are_value_errors(shape):
    """What the callers catch: never an OverflowError or TypeError of numpy's."""
    data = _with_header(
        f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}", b"\0" * 8
    )

    with pytest.raises(ValueError):
        read_npy(data, trailing=True)
