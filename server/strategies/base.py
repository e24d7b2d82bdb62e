"""What every round strategy offers the round loop, and what its training phase returns.

A strategy configures its own messages (which sites, which round config) and turns
the sites' train replies into one aggregate delta. :class:`RoundStrategy` is the
shape the round loop (:class:`~wardround.server.phases.RoundPhases`) relies on;
:mod:`.fedavg` and :mod:`.fedprox` implement it, :mod:`.secagg_plus` wraps any of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from ...common import wire
from ..records import SiteFailure


@dataclass(frozen=True)
class Contribution:
    """One site's train reply that counted in the round's aggregate."""

    node_id: int
    metrics: dict[str, Any]
    """The numeric metrics the site sent (``wire.NUM_EXAMPLES`` always among them)."""
    bytes_sent: int


@dataclass(frozen=True)
class TrainExchange:
    """What a strategy's training phase produced, before the round loop names sites."""

    contributions: list[Contribution]
    failures: list[SiteFailure]
    mean_delta: dict[str, np.ndarray] | None
    """The example-weighted mean delta; None when no site's update counted."""
    aggregation: wire.Aggregation
    aggregation_seconds: float
    secure_aggregation: dict[str, Any] | None = None
    """The SecAgg+ settings and figures of the round (manifest), or None."""


@dataclass(frozen=True)
class ExchangeLimits:
    """What the round loop tells a strategy about one training phase."""

    server_round: int
    timeout_s: float
    """``federation.round-timeout-s``: how long replies are waited for."""
    payload_shapes: Mapping[str, tuple[int, ...]]
    """The shapes of the tensors a delta carries (SecAgg+ sums them unnamed)."""


class RoundStrategy(Protocol):
    """A strategy as the round loop uses it (Flower's ``configure_*`` signatures)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the round's sites; one train message each (``config`` completed)."""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the sites that evaluate ``arrays``; one message each."""

    def exchange_train(
        self, grid: Grid, messages: list[Message], limits: ExchangeLimits
    ) -> TrainExchange:
        """Send the train messages; collect, check and aggregate the replies."""

    def note_train_examples(self, node_id: int, num_examples: int) -> None:
        """A site's training-set size, as its evaluate reply or a resumed record says."""

    def manifest_settings(self) -> dict[str, Any]:
        """What the train messages carry, for the round manifests."""
