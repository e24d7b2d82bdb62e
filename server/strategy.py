"""Flower strategies used for node sampling and round configuration.

Flower's ``FedAvg``/``FedProx`` choose the sites of a round and build their
messages (FedProx adds ``proximal-mu``). Aggregation of the *deltas* they return
is done by the pure functions in ``common/aggregation.py``.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx

from ..common import wire
from ..common.config import FederationConfig, Strategy


def make_strategy(federation: FederationConfig) -> FedAvg:
    """The Flower strategy for a run's federation settings."""
    common = {
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": federation.fraction_evaluate,
        "min_train_nodes": federation.min_sites,
        "min_evaluate_nodes": federation.min_sites,
        "min_available_nodes": federation.min_sites,
        "weighted_by_key": wire.NUM_EXAMPLES,
        "arrayrecord_key": wire.GLOBAL_ADAPTER,
        "configrecord_key": wire.CONFIG,
    }
    if federation.strategy is Strategy.FEDPROX:
        return FedProx(proximal_mu=federation.proximal_mu, **common)
    return FedAvg(**common)
