import numpy as np
import pytest

from wardround.common.aggregation import (
    apply_delta,
    subtract,
    weighted_mean,
    weighted_metric_mean,
)
from wardround.common.errors import FederationError


def test_weighted_mean_matches_closed_form():
    a = {
        "w": np.array([1.0, 2.0], dtype=np.float32),
        "b": np.array([[0.0]], dtype=np.float32),
    }
    b = {
        "w": np.array([3.0, 6.0], dtype=np.float32),
        "b": np.array([[4.0]], dtype=np.float32),
    }
    out = weighted_mean([a, b], [1, 3])
    # (1*1 + 3*3)/4 = 2.5 ; (1*2 + 3*6)/4 = 5 ; (0 + 12)/4 = 3
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    np.testing.assert_allclose(out["b"], [[3.0]])
    assert out["w"].dtype == np.float32


def test_weighted_mean_is_not_unweighted():
    a = {"w": np.zeros(1, dtype=np.float32)}
    b = {"w": np.ones(1, dtype=np.float32)}
    assert weighted_mean([a, b], [9, 1])["w"][0] == pytest.approx(0.1)


def test_apply_delta_and_subtract_are_inverse():
    w = {"x": np.array([1.0, -2.0], dtype=np.float32)}
    t = {"x": np.array([0.5, 4.0], dtype=np.float32)}
    np.testing.assert_allclose(apply_delta(w, subtract(t, w))["x"], t["x"])


@pytest.mark.parametrize(
    ("updates", "weights"),
    [
        ([], []),
        ([{"x": np.zeros(2)}], [0]),
        ([{"x": np.zeros(2)}, {"y": np.zeros(2)}], [1, 1]),
        ([{"x": np.zeros(2)}, {"x": np.zeros(3)}], [1, 1]),
        ([{"x": np.zeros(2)}], [-1]),
    ],
)
def test_weighted_mean_rejects_inconsistent_updates(updates, weights):
    with pytest.raises(FederationError):
        weighted_mean(updates, weights)


def test_metric_mean_skips_nan():
    assert weighted_metric_mean([0.5, float("nan"), 0.9], [1, 5, 3]) == pytest.approx(
        (0.5 + 2.7) / 4
    )
