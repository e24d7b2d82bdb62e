"""SecAgg+ as a wrapper around any strategy.

Bell et al., 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead".

The wrapped strategy samples the sites and configures the train messages; the
training phase then runs Flower's SecAgg+ workflow (bridged in
:mod:`wardround.flower_compat.secagg_workflow`), so the coordinator only ever sees
the unmasked example-weighted mean of the deltas. The quantization settings follow
from the delta bound (:func:`~wardround.common.secagg_math.plan_quantization`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from ...common import wire
from ...common.adapter import l2_norm
from ...common.config import SecureAggregationConfig
from ...common.errors import error_kind
from ...common.secagg_math import (
    QuantizationPlan,
    largest_honest_mean_norm,
    mean_error_bound,
    plan_quantization,
)
from ...flower_compat.secagg_workflow import SecureRoundResult, run_secure_train
from ..records import SiteFailure
from ..replies import CLIP_SLACK
from .base import Contribution, ExchangeLimits, RoundStrategy, TrainExchange

SECURE_MEAN_OUT_OF_BOUND = "SecureMeanOutOfBound"
"""The failure kind of every participant of a round whose secure mean was discarded."""

UNKNOWN_MAX_WEIGHT = 100_000
"""SecAgg+ max weight before any site has reported its training-set size."""

log = logging.getLogger(__name__)


class SecAggPlus:
    """``inner``'s sampling and messages; its training phase under SecAgg+.

    Parameters
    ----------
    inner
        The strategy that samples sites and configures their messages.
    settings
        The run's ``secure-aggregation`` section (shares, threshold, timeouts).
    delta_clip_norm
        ``federation.delta-clip-norm``: the bound the quantization range covers.
    """

    def __init__(
        self,
        inner: RoundStrategy,
        settings: SecureAggregationConfig,
        delta_clip_norm: float,
    ) -> None:
        self.inner = inner
        self.settings = settings
        self.delta_clip_norm = delta_clip_norm
        self.train_examples: dict[int, int] = {}
        """node id -> training-set size (sets SecAgg+'s max weight); grows per round."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's train messages."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluate messages (evaluation is not masked)."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def note_train_examples(self, node_id: int, num_examples: int) -> None:
        """Remember a site's training-set size for the next rounds' max weight."""
        self.train_examples[node_id] = num_examples

    def manifest_settings(self) -> dict[str, Any]:
        """The inner strategy's (SecAgg+'s own figures are in each round's record)."""
        return self.inner.manifest_settings()

    def exchange_train(
        self, grid: Grid, messages: list[Message], limits: ExchangeLimits
    ) -> TrainExchange:
        """Run the four SecAgg+ stages over ``messages``; the unmasked mean comes back."""
        sampled = [int(m.metadata.dst_node_id) for m in messages]
        plan = self._plan(sampled)
        for msg in messages:
            msg.content.config_records[wire.CONFIG][wire.SECAGG_MAX_WEIGHT] = (
                plan.max_weight
            )
        result = run_secure_train(
            grid,
            messages,
            server_round=limits.server_round,
            payload_shapes=limits.payload_shapes,
            settings=self.settings,
            plan=plan,
            arrays_key=wire.GLOBAL_ADAPTER,
            config_key=wire.CONFIG,
        )
        # A site that gave no reason of its own dropped out of the protocol (or it
        # halted for want of live sites): asked again, it may take part.
        failures = [
            SiteFailure(
                node,
                "train",
                reason,
                error_kind(reason),
                went_away=error_kind(reason) is None,
            )
            for node, reason in result.failures.items()
        ]
        for failure in failures:
            log.warning(
                "site %s left secure aggregation: %s",
                failure.node_id,
                failure.reason.splitlines()[0] if failure.reason else "",
            )
        halted = result.mean_delta is None  # nobody's update counts
        beyond = None if halted else self._beyond_the_bound(plan, result)
        if beyond is not None:
            # Some site skipped the clip; SecAgg+ hides which: no update counts.
            log.error("secure aggregation: %s", beyond)
            failures = [
                SiteFailure(node, "train", beyond, SECURE_MEAN_OUT_OF_BOUND)
                for node in result.site_metrics
            ] + failures
            halted = True
        return TrainExchange(
            contributions=[]
            if halted
            else [
                Contribution(node, metrics, result.bytes_up.get(node, 0))
                for node, metrics in result.site_metrics.items()
            ],
            failures=failures,
            mean_delta=None if halted else dict(result.mean_delta or {}),
            aggregation=wire.Aggregation.SECAGG_PLUS,
            aggregation_seconds=result.unmask_seconds,
            secure_aggregation=self._figures(plan, len(sampled), result),
        )

    def _beyond_the_bound(
        self, plan: QuantizationPlan, result: SecureRoundResult
    ) -> str | None:
        """Why the unmasked mean cannot be the mean of clipped deltas, or None."""
        mean: dict[str, np.ndarray] = result.mean_delta or {}
        norm = l2_norm(mean)
        limit = largest_honest_mean_norm(
            plan,
            len(result.site_metrics),
            self.delta_clip_norm,
            result.weight_sum,
            sum(int(np.size(v)) for v in mean.values()),
            CLIP_SLACK,
        )
        if norm <= limit:
            return None
        return (
            f"the unmasked mean delta has L2 norm {norm:.4g}, above the "
            f"{limit:.4g} that deltas clipped to federation.delta-clip-norm = "
            f"{self.delta_clip_norm:g} allow: a site sent an unclipped update, so "
            "this round's update is discarded"
        )

    def _plan(self, sampled: list[int]) -> QuantizationPlan:
        known = [self.train_examples[n] for n in sampled if n in self.train_examples]
        return plan_quantization(
            self.delta_clip_norm,
            len(sampled),
            max(known) if known else UNKNOWN_MAX_WEIGHT,
        )

    def _figures(
        self, plan: QuantizationPlan, sampled: int, result: SecureRoundResult
    ) -> dict[str, Any]:
        """The round's SecAgg+ settings and error bound, as its manifest records them."""
        aggregated = len(result.site_metrics)
        return {
            "sites_sampled": sampled,
            "sites_aggregated": aggregated,
            "num_shares": result.num_shares,
            "reconstruction_threshold": result.threshold,
            "clipping_range": plan.clipping_range,
            "quantization_range": plan.quantization_range,
            "modulus_range": plan.modulus_range,
            "max_weight": plan.max_weight,
            "weight_sum": result.weight_sum,
            "max_abs_error_per_coordinate": mean_error_bound(
                plan, aggregated, self.delta_clip_norm, result.weight_sum
            )
            if aggregated
            else None,
            "protocol_seconds": result.protocol_seconds,
        }
