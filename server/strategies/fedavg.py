"""FedAvg over adapter deltas.

McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data".

Flower's own ``FedAvg`` samples the sites and builds the messages; the sites reply
with *deltas* (trained - global), which this strategy averages with the pure
:func:`~wardround.common.aggregation.weighted_mean_vector` of the packed deltas.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower_strategy

from ...common import wire
from ...common.aggregation import weighted_mean_vector
from ...common.config import FederationConfig, Strategy
from ...common.packing import AdapterLayout
from ...common.wirebytes import content_bytes
from ..replies import check_train_reply, release_round_arrays, split_replies
from .base import Contribution, ExchangeLimits, TrainExchange


class FedAvg:
    r"""The global delta is the example-weighted mean of the sites' deltas.

    .. math:: \Delta = \sum_k \frac{n_k}{\sum_j n_j} \Delta_k

    The train messages carry no strategy settings: FedAvg sends none.
    """

    kind = Strategy.FEDAVG

    def __init__(self, federation: FederationConfig) -> None:
        self.transport = federation.transport_dtype
        self.clip_norm = federation.delta_clip_norm
        # Flower's FedAvg: the sampling (min sites, fractions) and message building.
        self.sampler = flower_strategy.FedAvg(
            fraction_train=federation.fraction_train,
            fraction_evaluate=federation.fraction_evaluate,
            min_train_nodes=federation.min_sites,
            min_evaluate_nodes=federation.min_sites,
            min_available_nodes=federation.min_sites,
            weighted_by_key=wire.NUM_EXAMPLES,
            arrayrecord_key=wire.GLOBAL_ADAPTER,
            configrecord_key=wire.CONFIG,
        )

    def train_settings(self) -> dict[str, Any]:
        """The strategy's own entries in every train message's config (none)."""
        return {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the round's sites; each gets ``arrays`` and ``config`` + settings."""
        for key, value in self.train_settings().items():
            config[key] = value
        return self.sampler.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the sites that evaluate ``arrays``."""
        return self.sampler.configure_evaluate(server_round, arrays, config, grid)

    def exchange_train(
        self, grid: Grid, messages: list[Message], limits: ExchangeLimits
    ) -> TrainExchange:
        """Send, collect the deltas within the timeout, and average them."""
        replies = list(grid.send_and_receive(messages, timeout=limits.timeout_s))
        payload = AdapterLayout.of_shapes(limits.payload_shapes)
        decoded: dict[int, np.ndarray] = {}  # id(reply) -> its checked delta
        ok, failures = split_replies(
            replies,
            "train",
            (wire.ADAPTER_DELTA, wire.METRICS),
            sent=messages,
            timeout_s=limits.timeout_s,
            check=functools.partial(
                check_train_reply,
                payload=payload,
                transport=self.transport,
                clip_norm=self.clip_norm,
                decoded=decoded,
            ),
        )
        # Site order fixes the float sum's order: the same seed, the same mean.
        ok.sort(key=_site_index)
        contributions = [
            Contribution(
                node_id=int(msg.metadata.src_node_id),
                metrics=dict(_metrics(msg)),
                bytes_sent=content_bytes(msg.content),
            )
            for msg in ok
        ]
        release_round_arrays(messages, replies)
        start = time.perf_counter()
        mean = (
            payload.unpack(
                weighted_mean_vector(
                    [decoded.pop(id(msg)) for msg in ok],
                    [float(int(c.metrics[wire.NUM_EXAMPLES])) for c in contributions],
                )
            )
            if ok
            else None
        )
        return TrainExchange(
            contributions=contributions,
            failures=failures,
            mean_delta=mean,
            aggregation=wire.Aggregation.PLAIN,
            aggregation_seconds=time.perf_counter() - start,
        )

    def note_train_examples(self, node_id: int, num_examples: int) -> None:
        """Plain averaging weighs by what each reply says: nothing to keep."""

    def manifest_settings(self) -> dict[str, Any]:
        """The strategy and the proximal term its train messages carry (none: 0)."""
        return {
            "strategy": self.kind.value,
            "proximal_mu": float(self.train_settings().get(wire.PROXIMAL_MU, 0.0)),
        }


def _site_index(msg: Message) -> int:
    """The index a reply states (``check_train_reply`` let only whole numbers by)."""
    index = _metrics(msg).get(wire.SITE_INDEX, -1)
    return index if isinstance(index, int) else -1


def _metrics(msg: Message) -> MetricRecord:
    """A sound reply's metrics (the site's egress guard sends them as a MetricRecord)."""
    return cast(MetricRecord, msg.content[wire.METRICS])
