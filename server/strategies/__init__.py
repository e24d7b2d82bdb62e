"""Round strategies: one per file, SecAgg+ as a wrapper any of them composes with.

- :class:`~.fedavg.FedAvg`: example-weighted mean of the sites' deltas;
- :class:`~.fedprox.FedProx`: FedAvg whose train messages carry ``proximal-mu``;
- :class:`~.secagg_plus.SecAggPlus`: wraps a strategy; its training phase runs
  under secure aggregation.

:func:`make_strategy` builds the one a run's config asks for.
"""

from __future__ import annotations

from ...common.config import FederationConfig, SecureAggregationConfig, Strategy
from .base import (
    Contribution,
    ExchangeLimits,
    RoundStrategy,
    TrainExchange,
)
from .fedavg import FedAvg
from .fedprox import FedProx
from .secagg_plus import SecAggPlus

__all__ = [
    "Contribution",
    "ExchangeLimits",
    "FedAvg",
    "FedProx",
    "RoundStrategy",
    "SecAggPlus",
    "TrainExchange",
    "make_strategy",
]


def make_strategy(
    federation: FederationConfig,
    secure_aggregation: SecureAggregationConfig | None = None,
) -> RoundStrategy:
    """The strategy for a run: FedAvg or FedProx, under SecAgg+ when it is enabled."""
    base: FedAvg = (
        FedProx(federation)
        if federation.strategy is Strategy.FEDPROX
        else FedAvg(federation)
    )
    if secure_aggregation is None or not secure_aggregation.enabled:
        return base
    return SecAggPlus(base, secure_aggregation, federation.delta_clip_norm)
