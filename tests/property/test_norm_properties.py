"""Delta norms are summed in float64 blocks: exact enough, and bounded in memory."""

import math
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from wardround.common import adapter
from wardround.common.adapter import l2_norm, vector_l2_norm
from wardround.common.config.enums import TransportDtype
from wardround.common.transport import decode

any_float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=80, deadline=None)
@given(
    arrays(np.float32, st.integers(0, 300), elements=any_float32),
    st.integers(1, 64),
)
def test_blocked_norm_is_numpys_float64_norm(values, block):
    """Across block boundaries, and non-finite exactly when a value is."""
    saved = adapter.NORM_BLOCK
    adapter.NORM_BLOCK = block
    try:
        norm = vector_l2_norm(values)
    finally:
        adapter.NORM_BLOCK = saved
    if not np.isfinite(values).all():
        assert not math.isfinite(norm)
        return
    expected = float(np.linalg.norm(values.astype(np.float64)))
    assert norm == pytest.approx(expected, rel=1e-12, abs=1e-300)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        arrays(
            np.float32,
            st.tuples(st.integers(1, 5), st.integers(1, 5)),
            elements=st.floats(-1e6, 1e6, width=32),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_norm_of_tensors_is_the_norm_of_them_packed(tensors):
    state = {f"t{i}": t for i, t in enumerate(tensors)}
    packed = np.concatenate([t.ravel() for t in tensors])
    assert l2_norm(state) == pytest.approx(vector_l2_norm(packed), rel=1e-12)


def test_the_norm_of_a_large_delta_needs_no_float64_copy():
    """A 32 MB float32 delta: the norm's temporaries stay two float64 blocks.

    (The next block is made before the last one is freed.) A float64 copy of the
    whole delta would be 64 MB, four times the bound.
    """
    values = np.ones(8 * adapter.NORM_BLOCK, dtype=np.float32)
    tracemalloc.start()
    try:
        norm = vector_l2_norm(values)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert norm == pytest.approx(math.sqrt(values.size))
    assert peak <= 2 * 8 * adapter.NORM_BLOCK + 65_536


@pytest.mark.parametrize(
    ("bits", "dtype", "transport"),
    [
        (0x7F800001, np.uint32, TransportDtype.FLOAT32),  # float32 signalling NaN
        (0x7F81, np.uint16, TransportDtype.BFLOAT16),
        (0x7C01, np.uint16, TransportDtype.FLOAT16),
    ],
)
def test_a_signalling_nan_is_refused_without_a_floating_point_warning(
    bits, dtype, transport
):
    """A site cannot make the coordinator's check warn (or raise under -W error)."""
    wire = np.array([0, bits, 0], dtype=dtype)
    if transport is TransportDtype.FLOAT32:
        values = wire.view(np.float32)
    elif transport is TransportDtype.FLOAT16:
        values = decode(wire.view(np.float16), transport)
    else:
        values = decode(wire, transport)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not math.isfinite(vector_l2_norm(values))
