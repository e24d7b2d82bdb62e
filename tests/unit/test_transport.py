"""Half-precision transport of a plain round's delta: what it keeps and what it costs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wardround.common.config.enums import TransportDtype
from wardround.common.transport import WIRE_DTYPES, decode, encode, relative_error

floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@given(st.lists(floats32, min_size=1, max_size=64))
def test_bfloat16_is_float32_rounded_to_8_significant_bits(values):
    vector = np.asarray(values, np.float32)

    back = decode(encode(vector, TransportDtype.BFLOAT16), TransportDtype.BFLOAT16)

    assert back.dtype == np.float32
    # round to nearest: within half a unit in the last of 8 significant bits
    finite = np.isfinite(back)
    tolerance = np.abs(vector[finite]) * 2.0**-8 + np.finfo(np.float32).tiny
    assert np.all(np.abs(back[finite] - vector[finite]) <= tolerance)
    # only values within half a bfloat16 unit of float32's largest may round to inf
    assert np.all(np.abs(vector[~finite]) > 3.38e38)


def test_bfloat16_rounds_ties_to_even_and_keeps_nan_and_sign():
    one_and_half_unit = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8], np.float32)
    specials = np.array([np.nan, -0.0, np.inf, -np.inf], np.float32)

    back = decode(
        encode(one_and_half_unit, TransportDtype.BFLOAT16), TransportDtype.BFLOAT16
    )
    kept = decode(encode(specials, TransportDtype.BFLOAT16), TransportDtype.BFLOAT16)

    assert back.tolist() == [1.0, 1.0 + 4 * 2.0**-8]
    assert (
        np.isnan(kept[0])
        and np.signbit(kept[1])
        and kept[2:].tolist() == [np.inf, -np.inf]
    )


@pytest.mark.parametrize("dtype", list(TransportDtype))
def test_each_transport_travels_in_its_declared_dtype(dtype):
    vector = np.random.default_rng(0).normal(0, 0.01, 1000).astype(np.float32)

    wire = encode(vector, dtype)

    assert wire.dtype == WIRE_DTYPES[dtype] and wire.shape == vector.shape
    assert wire.nbytes == vector.nbytes // (1 if dtype is TransportDtype.FLOAT32 else 2)


def test_the_relative_error_is_what_each_format_keeps():
    vector = np.random.default_rng(1).normal(0, 0.01, 100_000).astype(np.float32)

    errors = {dtype: relative_error(vector, dtype) for dtype in TransportDtype}

    assert errors[TransportDtype.FLOAT32] == 0.0
    assert 1e-5 < errors[TransportDtype.FLOAT16] < 2.0**-11
    assert 2.0**-11 < errors[TransportDtype.BFLOAT16] < 2.0**-8


def test_float16_overflow_becomes_infinity_for_the_guard_to_refuse():
    wire = encode(np.array([1e5], np.float32), TransportDtype.FLOAT16)

    assert np.isinf(wire).all()
