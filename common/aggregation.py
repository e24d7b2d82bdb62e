"""Pure aggregation math over adapter deltas (numpy only, no I/O).

Sites send ``delta_i = w_i - w_global`` for every trainable tensor. FedAvg and
FedProx (McMahan et al., 2017; Li et al., 2020) both aggregate by the
example-weighted mean ``Δ = Σ n_i·delta_i / Σ n_i`` and step ``w ← w + η·Δ`` with
server learning rate ``η = 1``. LoRA factors are averaged *separately*:
``mean(B_i)·mean(A_i)`` is not ``mean(B_i·A_i)``; that inexactness is the price of
standard federated LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import FederationError

Tensors = Mapping[str, np.ndarray]


def weighted_mean(
    updates: Sequence[Tensors], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Example-weighted mean of several tensor dicts with identical keys and shapes.

    Computed in float64 and returned as float32.
    """
    if not updates:
        raise FederationError("no site update to aggregate")
    if len(updates) != len(weights):
        raise ValueError("one weight per update is needed")
    w = _checked_weights(weights)
    keys = list(updates[0].keys())
    for i, update in enumerate(updates[1:], start=1):
        if list(update.keys()) != keys:
            missing = set(keys) ^ set(update.keys())
            raise FederationError(
                f"update {i} has other tensors than update 0: {sorted(missing)[:5]}"
            )
    out: dict[str, np.ndarray] = {}
    for key in keys:
        shapes = {u[key].shape for u in updates}
        if len(shapes) != 1:
            raise FederationError(
                f"tensor {key} arrives with different shapes: {sorted(shapes)}"
            )
        out[key] = _mean_of_equal_shapes([u[key] for u in updates], w)
    return out


def weighted_mean_vector(
    vectors: Sequence[np.ndarray], weights: Sequence[float]
) -> np.ndarray:
    """Example-weighted mean of several packed adapter vectors of one length.

    The same float64 arithmetic as :func:`weighted_mean`, value for value, so the
    mean of packed vectors is the packed mean of their tensors.
    """
    if not vectors:
        raise FederationError("no site update to aggregate")
    if len(vectors) != len(weights):
        raise ValueError("one weight per update is needed")
    sizes = {np.shape(v) for v in vectors}
    if len(sizes) != 1 or any(np.ndim(v) != 1 for v in vectors):
        raise FederationError(
            f"packed updates must be vectors of one length, got {sorted(sizes)}"
        )
    return _mean_of_equal_shapes(list(vectors), _checked_weights(weights))


MEAN_BLOCK = 1 << 20
"""Values per block of the float64 accumulator: 8 MiB at most, whatever the adapter
(a float64 accumulator of a 40 M-value adapter would be 320 MB, twice the adapter)."""


def _checked_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise FederationError(
            f"example counts must be non-negative and sum > 0, got {list(weights)}"
        )
    return w


def _mean_of_equal_shapes(arrays: Sequence[np.ndarray], w: np.ndarray) -> np.ndarray:
    """``Σ w_i·a_i / Σ w_i`` in float64, as float32, one block of values at a time."""
    flats = [np.ravel(a) for a in arrays]
    out = np.empty(flats[0].size, dtype=np.float32)
    total = w.sum()
    for start in range(0, out.size, MEAN_BLOCK):
        stop = min(start + MEAN_BLOCK, out.size)
        acc = np.zeros(stop - start, dtype=np.float64)
        for weight, flat in zip(w, flats, strict=True):
            acc += weight * flat[start:stop].astype(np.float64)
        out[start:stop] = acc / total
    return out.reshape(np.shape(arrays[0]))


def apply_delta(
    weights: Tensors, delta: Tensors, server_lr: float = 1.0
) -> dict[str, np.ndarray]:
    """Return ``weights + server_lr * delta``; tensors without a delta stay as they are.

    Every key of ``delta`` must be a tensor of ``weights`` (FFA-LoRA's frozen A
    factors have no delta).
    """
    unknown = set(delta) - set(weights)
    if unknown:
        raise FederationError(
            "the aggregated delta holds tensors the global adapter does not: "
            f"{sorted(unknown)[:3]}"
        )
    return {
        k: _stepped(weights[k], delta[k], server_lr) if k in delta else weights[k]
        for k in weights
    }


def _stepped(weight: np.ndarray, delta: np.ndarray, server_lr: float) -> np.ndarray:
    """``weight + server_lr * delta`` in float32, in one new array."""
    out = np.array(weight, dtype=np.float32)
    out += delta if server_lr == 1.0 else np.float32(server_lr) * delta
    return out


def subtract(trained: Tensors, reference: Tensors) -> dict[str, np.ndarray]:
    """The delta ``trained - reference`` as float32 (same keys required)."""
    if set(trained) != set(reference):
        raise FederationError("trained and reference adapters hold different tensors")
    return {
        k: (trained[k].astype(np.float32) - reference[k].astype(np.float32))
        for k in reference
    }


def weighted_metric_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Example-weighted mean of a scalar metric, ignoring NaN values."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(v) & (w > 0)
    return float(np.sum(v[ok] * w[ok]) / np.sum(w[ok])) if ok.any() else float("nan")
