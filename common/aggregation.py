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
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise FederationError(
            f"example counts must be non-negative and sum > 0, got {list(weights)}"
        )
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
        acc = np.zeros(updates[0][key].shape, dtype=np.float64)
        for weight, update in zip(w, updates, strict=True):
            acc += weight * update[key].astype(np.float64)
        out[key] = (acc / w.sum()).astype(np.float32)
    return out


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
        k: (
            weights[k].astype(np.float32) + np.float32(server_lr) * delta[k]
            if k in delta
            else weights[k]
        ).astype(np.float32)
        for k in weights
    }


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
