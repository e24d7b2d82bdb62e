import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from wardround.common.aggregation import weighted_mean

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
shapes = st.tuples(st.integers(1, 4), st.integers(1, 4))


@st.composite
def same_shape_tensors(draw, min_size=1, max_size=5):
    shape = draw(shapes)
    n = draw(st.integers(min_size, max_size))
    return [draw(arrays(np.float32, shape, elements=finite)) for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, shapes, elements=finite),
    st.lists(st.integers(1, 1000), min_size=1, max_size=6),
)
def test_aggregate_of_identical_updates_is_that_update(value, weights):
    out = weighted_mean([{"t": value}] * len(weights), weights)
    np.testing.assert_allclose(out["t"], value, rtol=1e-6, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(same_shape_tensors(min_size=2), st.data())
def test_aggregate_lies_within_the_updates(values, data):
    weights = data.draw(
        st.lists(st.integers(1, 50), min_size=len(values), max_size=len(values))
    )
    out = weighted_mean([{"t": v} for v in values], weights)["t"]
    stack = np.stack(values)
    assert np.all(out >= stack.min(0) - 1e-3) and np.all(out <= stack.max(0) + 1e-3)


@settings(max_examples=40, deadline=None)
@given(
    same_shape_tensors(min_size=2, max_size=2), st.integers(1, 100), st.integers(1, 100)
)
def test_aggregate_is_order_invariant(pair, wa, wb):
    a, b = pair
    x = weighted_mean([{"t": a}, {"t": b}], [wa, wb])["t"]
    y = weighted_mean([{"t": b}, {"t": a}], [wb, wa])["t"]
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-5)
