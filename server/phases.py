"""The two phases of a round: sites train the global adapter, then evaluate it.

Flower's strategy samples the sites and builds the messages; replies are checked and
turned into typed reports. Failed replies become :class:`SiteFailure` records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from ..common import wire
from ..common.adapter import from_record, to_record
from ..common.config import RunConfig
from ..common.errors import FederationError
from .records import SiteEvalReport, SiteFailure, SiteTrainReport

log = logging.getLogger(__name__)


def _array_bytes(msg: Message, key: str) -> int:
    record = msg.content[key]
    return int(sum(len(record[k].data) for k in record.keys()))


def _split_replies(
    replies: Iterable[Message], phase: str, need: tuple[str, ...]
) -> tuple[list[Message], list[SiteFailure]]:
    ok, failed = [], []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            failed.append(SiteFailure(node, phase, msg.error.reason[:500]))
        elif any(k not in msg.content for k in need):
            failed.append(
                SiteFailure(
                    node,
                    phase,
                    f"reply lacks {[k for k in need if k not in msg.content]}",
                )
            )
        else:
            ok.append(msg)
    for failure in failed:
        log.warning(
            "site %s failed in %s: %s",
            failure.node_id,
            phase,
            failure.reason.splitlines()[0] if failure.reason else "",
        )
    return ok, failed


@dataclass(frozen=True)
class RoundPhases:
    """What both phases of every round need."""

    strategy: Any  # a Flower strategy: configure_train / configure_evaluate
    grid: Grid
    config: RunConfig
    fingerprint: str
    name_of: Callable[[int, int], str]

    def train(
        self, server_round: int, global_state: dict[str, np.ndarray]
    ) -> tuple[list[SiteTrainReport], list[dict[str, np.ndarray]], list[SiteFailure]]:
        """Sampled sites train the global adapter; return their reports and deltas (same order)."""
        train_config = ConfigRecord(
            {
                wire.BASE_FINGERPRINT: self.fingerprint,
                wire.PAYLOAD_KIND: wire.PayloadKind.WEIGHTS.value,
            }
        )
        messages = list(
            self.strategy.configure_train(
                server_round, to_record(global_state), train_config, self.grid
            )
        )
        replies = self.grid.send_and_receive(
            messages, timeout=self.config.federation.round_timeout_s
        )
        ok, failures = _split_replies(
            replies, "train", (wire.ADAPTER_DELTA, wire.METRICS)
        )
        if len(ok) < self.config.federation.min_sites:
            reasons = "; ".join(
                f"node {f.node_id}: {f.reason.splitlines()[0] if f.reason else '?'}"
                for f in failures
            )
            raise FederationError(
                f"round {server_round}: {len(ok)} site(s) trained, the run needs "
                f"federation.min-sites={self.config.federation.min_sites}. {reasons}",
                hint="Check the failing sites' logs, or lower federation.min-sites.",
            )
        reports, deltas = [], []
        for msg in sorted(
            ok, key=lambda m: int(m.content[wire.METRICS].get(wire.SITE_INDEX, -1))
        ):
            metrics = msg.content[wire.METRICS]
            node = int(msg.metadata.src_node_id)
            deltas.append(from_record(msg.content[wire.ADAPTER_DELTA]))
            reports.append(
                SiteTrainReport(
                    node_id=node,
                    site=self.name_of(node, int(metrics.get(wire.SITE_INDEX, -1))),
                    num_examples=int(metrics[wire.NUM_EXAMPLES]),
                    loss=float(metrics[wire.TRAIN_LOSS]),
                    steps=int(metrics[wire.TRAIN_STEPS]),
                    seconds=float(metrics[wire.TRAIN_SECONDS]),
                    delta_l2=float(metrics[wire.DELTA_L2]),
                    bytes_sent=_array_bytes(msg, wire.ADAPTER_DELTA),
                )
            )
        return reports, deltas, failures

    def evaluate(
        self, server_round: int, global_state: dict[str, np.ndarray]
    ) -> tuple[list[SiteEvalReport], list[SiteFailure]]:
        """Every sampled site evaluates ``global_state`` on its validation split."""
        messages = list(
            self.strategy.configure_evaluate(
                server_round,
                to_record(global_state),
                ConfigRecord({wire.BASE_FINGERPRINT: self.fingerprint}),
                self.grid,
            )
        )
        replies = self.grid.send_and_receive(
            messages, timeout=self.config.federation.round_timeout_s
        )
        ok, failures = _split_replies(replies, "evaluate", (wire.METRICS,))
        reports = []
        for msg in ok:
            metrics = msg.content[wire.METRICS]
            node = int(msg.metadata.src_node_id)
            reports.append(
                SiteEvalReport(
                    node_id=node,
                    site=self.name_of(node, int(metrics.get(wire.SITE_INDEX, -1))),
                    num_examples=int(metrics[wire.NUM_EXAMPLES]),
                    loss=float(metrics[wire.EVAL_LOSS]),
                    auroc_macro=float(metrics[wire.AUROC_MACRO]),
                    auroc_per_label={
                        label: float(
                            metrics.get(wire.AUROC_PREFIX + label, float("nan"))
                        )
                        for label in self.config.task.labels
                    },
                )
            )
        return sorted(reports, key=lambda e: e.site), failures
