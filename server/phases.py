"""The two phases of a round: sites train the global adapter, then evaluate it.

The round's strategy (:mod:`wardround.server.strategies`) samples the sites,
configures their messages and aggregates the training replies; this module adds
what every strategy shares: the round config, the reports named by site, and the
rule that a round needs ``federation.min-sites`` sites.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from ..common import wire
from ..common.adapter import to_record, wire_header
from ..common.config import RunConfig
from ..common.errors import (
    FederationError,
    PrivacyBudgetExhausted,
    PrivacyPolicyRefused,
    WardroundError,
)
from .records import SiteEvalReport, SiteFailure, SiteTrainReport
from .replies import (
    NameOf,
    eval_report,
    reasons,
    release_round_arrays,
    split_replies,
    train_report,
)
from .strategies import ExchangeLimits, RoundStrategy
from .strategies.secagg_plus import SECURE_MEAN_OUT_OF_BOUND

_PRIVACY_REFUSALS = frozenset({"PrivacyBudgetExhausted", "PrivacyPolicyRefused"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPhase:
    """What the training phase of a round produced."""

    reports: list[SiteTrainReport]
    mean_delta: dict[str, np.ndarray]
    """The example-weighted mean of the sites' payload deltas."""
    failures: list[SiteFailure]
    aggregation: wire.Aggregation
    aggregation_seconds: float
    secure_aggregation: dict[str, Any] | None = None


@dataclass(frozen=True)
class ShortRound:
    """A training phase with fewer than min-sites usable replies: nothing to aggregate."""

    trained: int
    """How many sites' updates would have counted."""
    failures: list[SiteFailure]

    @property
    def sites_went_away(self) -> bool:
        """Whether asking again may help (see :func:`sites_went_away`)."""
        return sites_went_away(self.failures)


def sites_went_away(failures: list[SiteFailure]) -> bool:
    """Whether asking a phase again may help: some site went away rather than refused.

    Never for a secure mean beyond its bound: a site that skipped its clip would do
    so again.
    """
    return any(f.went_away for f in failures) and not any(
        f.kind == SECURE_MEAN_OUT_OF_BOUND for f in failures
    )


@dataclass(frozen=True)
class RoundPhases:
    """What both phases of every round need (the strategy keeps what rounds learn)."""

    strategy: RoundStrategy
    grid: Grid
    config: RunConfig
    fingerprint: str
    name_of: NameOf
    run_id: str
    payload_shapes: Mapping[str, tuple[int, ...]]
    on_sampled: Callable[[int, list[int]], None] | None = None
    """Called with (round, node ids) once the strategy has sampled a round's sites."""

    def _round_config(
        self, global_state: dict[str, np.ndarray], server_round: int | None = None
    ) -> ConfigRecord:
        """What every message of a round says besides the strategy's own settings."""
        config: dict[str, Any] = {
            wire.BASE_FINGERPRINT: self.fingerprint,
            wire.PAYLOAD_KIND: wire.PayloadKind.WEIGHTS.value,
            wire.RUN_ID: self.run_id,
            **wire_header(global_state),
        }
        if server_round is not None:
            config[wire.SERVER_ROUND] = server_round
        return ConfigRecord(config)

    def train(
        self, server_round: int, global_state: dict[str, np.ndarray]
    ) -> TrainPhase | ShortRound:
        """Sampled sites train the global adapter; return the aggregate and reports.

        A :class:`ShortRound` when fewer than min-sites' updates count: the caller
        asks the round again or stops the run (:meth:`stop_short`).
        """
        messages = list(
            self.strategy.configure_train(
                server_round,
                to_record(global_state),
                self._round_config(global_state),
                self.grid,
            )
        )
        if self.on_sampled is not None:
            self.on_sampled(
                server_round, [int(m.metadata.dst_node_id) for m in messages]
            )
        exchange = self.strategy.exchange_train(
            self.grid,
            messages,
            ExchangeLimits(
                server_round=server_round,
                timeout_s=self.config.federation.round_timeout_s,
                payload_shapes=self.payload_shapes,
            ),
        )
        counted = 0 if exchange.mean_delta is None else len(exchange.contributions)
        if counted < self.config.federation.min_sites or exchange.mean_delta is None:
            return ShortRound(counted, exchange.failures)
        reports = [
            train_report(c.node_id, c.metrics, c.bytes_sent, self.name_of)
            for c in exchange.contributions
        ]
        if exchange.aggregation is wire.Aggregation.SECAGG_PLUS:
            reports.sort(key=lambda r: r.site)  # no site order survives the masking
        return TrainPhase(
            reports=reports,
            mean_delta=exchange.mean_delta,
            failures=exchange.failures,
            aggregation=exchange.aggregation,
            aggregation_seconds=exchange.aggregation_seconds,
            secure_aggregation=exchange.secure_aggregation,
        )

    def stop_short(
        self, server_round: int, short: ShortRound, asked: int = 1, not_again: str = ""
    ) -> WardroundError:
        """The error that stops the run after a short round, saying why and what to do.

        ``asked``: how many times the round was asked; ``not_again``: why it is not
        asked again, where sites went away from it.
        """
        failures = short.failures
        times = f" (asked {asked} times)" if asked > 1 else ""
        message = (
            f"round {server_round}: {short.trained} site(s) trained{times}, the run "
            f"needs federation.min-sites={self.config.federation.min_sites}. "
            f"{reasons(failures, self.name_of)}"
        )
        discarded = [f for f in failures if f.kind == SECURE_MEAN_OUT_OF_BOUND]
        if discarded:
            return FederationError(
                f"round {server_round}: {discarded[0].reason}",
                hint="SecAgg+ hides which site sent it. Each site's log states its "
                "delta's norm when it clipped; revoke a site you do not trust. The "
                "run directory holds every completed round; a resume reruns this "
                "round, and each site spends its privacy budget for it again.",
            )
        if failures and all(f.kind == "PrivacyPolicyRefused" for f in failures):
            return PrivacyPolicyRefused(
                message,
                hint="The sites' privacy floors ([privacy] in their site.toml) refuse "
                "this run's settings: lower privacy.target-epsilon, or turn DP on. The "
                "run directory holds every completed round.",
            )
        if failures and all(f.kind == "AnswerRefused" for f in failures):
            return PrivacyPolicyRefused(
                message,
                hint="The sites have answered as many messages as the run they "
                "approved allows (a round repeated after a restart counts; so do "
                "the rounds of an earlier launch of the same run.toml). The rest is "
                "a new run: change run.toml and have the sites approve it. The run "
                "directory holds every completed round.",
            )
        if failures and all(f.kind in _PRIVACY_REFUSALS for f in failures):
            return PrivacyBudgetExhausted(
                message,
                hint="The sites' privacy floors or budgets stop this run; the run "
                "directory holds every completed round.",
            )
        hint = "Check the failing sites' logs, or lower federation.min-sites."
        if short.sites_went_away:
            hint += " A site that went away needs its daemon running and connected."
            if not_again:
                hint += f" Not asked again: {not_again}."
        return FederationError(message, hint=hint)

    def require_evaluated(
        self,
        server_round: int,
        evals: list[SiteEvalReport],
        failures: list[SiteFailure],
    ) -> None:
        """Raise FederationError when fewer than min-sites evaluated the round's adapter.

        Called after the round is written: its update is sound, only its metric is
        not, so the run directory keeps the round and the run stops.
        """
        if len(evals) >= self.config.federation.min_sites:
            return
        evaluate_failures = [f for f in failures if f.phase == "evaluate"]
        raise FederationError(
            f"round {server_round}: {len(evals)} site(s) evaluated the global "
            f"adapter, the run needs federation.min-sites="
            f"{self.config.federation.min_sites}. {reasons(evaluate_failures, self.name_of)}",
            hint="Check the failing sites' logs, or lower federation.min-sites.",
        )

    def evaluate(
        self,
        server_round: int,
        global_state: dict[str, np.ndarray],
        skip: frozenset[int] = frozenset(),
    ) -> tuple[list[SiteEvalReport], list[SiteFailure]]:
        """Every sampled site evaluates ``global_state`` on its validation split.

        ``skip``: node ids not asked (they have evaluated it already).
        """
        messages = [
            m
            for m in self.strategy.configure_evaluate(
                server_round,
                to_record(global_state),
                self._round_config(global_state, server_round),
                self.grid,
            )
            if int(m.metadata.dst_node_id) not in skip
        ]
        timeout = self.config.federation.round_timeout_s
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        release_round_arrays(messages, replies)
        ok, failures = split_replies(
            replies, "evaluate", (wire.METRICS,), sent=messages, timeout_s=timeout
        )
        reports = []
        for msg in ok:
            metrics = cast(MetricRecord, msg.content[wire.METRICS])
            node = int(msg.metadata.src_node_id)
            if wire.TRAIN_EXAMPLES in metrics:
                self.strategy.note_train_examples(
                    node, int(cast(float, metrics[wire.TRAIN_EXAMPLES]))
                )
            reports.append(
                eval_report(node, metrics, self.name_of, self.config.task.labels)
            )
        return sorted(reports, key=lambda e: e.site), failures
