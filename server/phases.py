"""The two phases of a round: sites train the global adapter, then evaluate it.

Flower's strategy samples the sites and builds the messages; replies are checked and
turned into typed reports. Failed replies become :class:`SiteFailure` records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from ..common import wire
from ..common.adapter import from_record, to_record
from ..common.aggregation import weighted_mean
from ..common.config import RunConfig
from ..common.errors import FederationError, PrivacyBudgetExhausted, error_kind
from ..common.release import version_from_metrics
from ..common.secagg_math import mean_error_bound, plan_quantization
from ..common.wirebytes import content_bytes
from .records import PrivacySpend, SiteEvalReport, SiteFailure, SiteTrainReport
from .secagg import run_secure_train

_UNKNOWN_MAX_WEIGHT = 100_000
"""SecAgg+ max weight before any site has reported its training-set size."""
_PRIVACY_REFUSALS = frozenset({"PrivacyBudgetExhausted", "PrivacyPolicyRefused"})

log = logging.getLogger(__name__)


def _split_replies(
    replies: Iterable[Message],
    phase: str,
    need: tuple[str, ...],
    *,
    sent_to: Iterable[int] = (),
    timeout_s: float = 0.0,
) -> tuple[list[Message], list[SiteFailure]]:
    ok, failed = [], []
    replies = list(replies)
    replied = {int(m.metadata.src_node_id) for m in replies}
    # A site that is connected but silent (hung, killed, cut off) sends no error:
    # name it here, so the round's record and the audit say who was missing.
    for node in sorted(set(sent_to) - replied):
        failed.append(
            SiteFailure(
                node,
                phase,
                f"no reply within federation.round-timeout-s ({timeout_s:g} s)",
            )
        )
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            reason = msg.error.reason[:500]
            failed.append(SiteFailure(node, phase, reason, error_kind(reason)))
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


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _reasons(failures: list[SiteFailure]) -> str:
    return "; ".join(
        f"node {f.node_id}: {f.reason.splitlines()[0] if f.reason else '?'}"
        for f in failures
    )


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
class RoundPhases:
    """What both phases of every round need."""

    strategy: Any  # a Flower strategy: configure_train / configure_evaluate
    grid: Grid
    config: RunConfig
    fingerprint: str
    name_of: Callable[[int, int], str]
    run_id: str
    payload_shapes: dict[str, tuple[int, ...]]
    train_examples: dict[int, int] = field(default_factory=dict)
    """node id -> training-set size, from evaluate replies (SecAgg+ weights)."""
    on_sampled: Callable[[int, list[int]], None] | None = None
    """Called with (round, node ids) once the strategy has sampled a round's sites."""
    on_incomplete: Callable[[int, list[SiteFailure]], None] | None = None
    """Called with a round's failures when too few sites trained for it to count."""

    def train(
        self, server_round: int, global_state: dict[str, np.ndarray]
    ) -> TrainPhase:
        """Sampled sites train the global adapter; return the aggregate and reports."""
        train_config = ConfigRecord(
            {
                wire.BASE_FINGERPRINT: self.fingerprint,
                wire.PAYLOAD_KIND: wire.PayloadKind.WEIGHTS.value,
                wire.RUN_ID: self.run_id,
            }
        )
        messages = list(
            self.strategy.configure_train(
                server_round, to_record(global_state), train_config, self.grid
            )
        )
        if self.on_sampled is not None:
            self.on_sampled(
                server_round, [int(m.metadata.dst_node_id) for m in messages]
            )
        if self.config.secure_aggregation.enabled:
            return self._train_secure(server_round, messages)
        timeout = self.config.federation.round_timeout_s
        sampled = [int(m.metadata.dst_node_id) for m in messages]
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        ok, failures = _split_replies(
            replies,
            "train",
            (wire.ADAPTER_DELTA, wire.METRICS),
            sent_to=sampled,
            timeout_s=timeout,
        )
        self._require_enough(server_round, len(ok), failures)
        reports, deltas = [], []
        for msg in sorted(
            ok, key=lambda m: int(m.content[wire.METRICS].get(wire.SITE_INDEX, -1))
        ):
            deltas.append(from_record(msg.content[wire.ADAPTER_DELTA]))
            reports.append(
                self._report(
                    int(msg.metadata.src_node_id),
                    dict(msg.content[wire.METRICS]),
                    content_bytes(msg.content),
                )
            )
        start = time.perf_counter()
        mean = weighted_mean(deltas, [float(r.num_examples) for r in reports])
        return TrainPhase(
            reports=reports,
            mean_delta=mean,
            failures=failures,
            aggregation=wire.Aggregation.PLAIN,
            aggregation_seconds=time.perf_counter() - start,
        )

    def _train_secure(self, server_round: int, messages: list[Message]) -> TrainPhase:
        sampled = [int(m.metadata.dst_node_id) for m in messages]
        known = [self.train_examples[n] for n in sampled if n in self.train_examples]
        plan = plan_quantization(
            self.config.federation.delta_clip_norm,
            len(sampled),
            max(known) if known else _UNKNOWN_MAX_WEIGHT,
        )
        for msg in messages:
            msg.content[wire.CONFIG][wire.SECAGG_MAX_WEIGHT] = plan.max_weight
        result = run_secure_train(
            self.grid,
            messages,
            server_round=server_round,
            payload_shapes=self.payload_shapes,
            settings=self.config.secure_aggregation,
            plan=plan,
            arrays_key=wire.GLOBAL_ADAPTER,
            config_key=wire.CONFIG,
        )
        failures = [
            SiteFailure(node, "train", reason, error_kind(reason))
            for node, reason in result.failures.items()
        ]
        for failure in failures:
            log.warning(
                "site %s left secure aggregation: %s",
                failure.node_id,
                failure.reason.splitlines()[0] if failure.reason else "",
            )
        if result.mean_delta is None:  # the protocol halted: nobody's update counts
            self._require_enough(server_round, 0, failures)
        self._require_enough(server_round, len(result.site_metrics), failures)
        assert result.mean_delta is not None
        reports = sorted(
            (
                self._report(node, metrics, result.bytes_up.get(node, 0))
                for node, metrics in result.site_metrics.items()
            ),
            key=lambda r: r.site,
        )
        bound = mean_error_bound(
            plan,
            len(result.site_metrics),
            self.config.federation.delta_clip_norm,
            result.weight_sum,
        )
        return TrainPhase(
            reports=reports,
            mean_delta=dict(result.mean_delta),
            failures=failures,
            aggregation=wire.Aggregation.SECAGG_PLUS,
            aggregation_seconds=result.unmask_seconds,
            secure_aggregation={
                "sites_sampled": len(sampled),
                "sites_aggregated": len(result.site_metrics),
                "num_shares": result.num_shares,
                "reconstruction_threshold": result.threshold,
                "clipping_range": plan.clipping_range,
                "quantization_range": plan.quantization_range,
                "modulus_range": plan.modulus_range,
                "max_weight": plan.max_weight,
                "weight_sum": result.weight_sum,
                "max_abs_error_per_coordinate": bound,
                "protocol_seconds": result.protocol_seconds,
            },
        )

    def _require_enough(
        self, server_round: int, trained: int, failures: list[SiteFailure]
    ) -> None:
        if trained >= self.config.federation.min_sites:
            return
        # The round leaves no record: say who failed in it before the run stops.
        if self.on_incomplete is not None:
            self.on_incomplete(server_round, failures)
        message = (
            f"round {server_round}: {trained} site(s) trained, the run needs "
            f"federation.min-sites={self.config.federation.min_sites}. "
            f"{_reasons(failures)}"
        )
        if failures and all(f.kind in _PRIVACY_REFUSALS for f in failures):
            raise PrivacyBudgetExhausted(
                message,
                hint="The sites' privacy floors or budgets stop this run; the run "
                "directory holds every completed round.",
            )
        raise FederationError(
            message,
            hint="Check the failing sites' logs, or lower federation.min-sites.",
        )

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
            f"{self.config.federation.min_sites}. {_reasons(evaluate_failures)}",
            hint="Check the failing sites' logs, or lower federation.min-sites.",
        )

    def _report(
        self, node: int, metrics: dict[str, Any], bytes_sent: int
    ) -> SiteTrainReport:
        privacy = None
        if wire.DP_EPSILON_RUN in metrics:
            privacy = PrivacySpend(
                epsilon_run=float(metrics[wire.DP_EPSILON_RUN]),
                epsilon_run_prv=float(metrics.get(wire.DP_EPSILON_RUN_PRV, -1.0)),
                epsilon_total=float(metrics[wire.DP_EPSILON_TOTAL]),
                delta=float(metrics[wire.DP_DELTA]),
                noise_multiplier=float(metrics[wire.DP_NOISE_MULTIPLIER]),
                sample_rate=float(metrics[wire.DP_SAMPLE_RATE]),
                steps=int(metrics[wire.DP_STEPS]),
                max_grad_norm=float(metrics[wire.DP_MAX_GRAD_NORM]),
                epsilon_budget=_optional_float(metrics.get(wire.DP_EPSILON_BUDGET)),
            )
        return SiteTrainReport(
            node_id=node,
            site=self.name_of(node, int(metrics.get(wire.SITE_INDEX, -1))),
            num_examples=int(metrics[wire.NUM_EXAMPLES]),
            # A site's answer policy may keep these home (always under SecAgg+).
            loss=float(metrics.get(wire.TRAIN_LOSS, float("nan"))),
            steps=int(metrics.get(wire.TRAIN_STEPS, 0)),
            seconds=float(metrics.get(wire.TRAIN_SECONDS, float("nan"))),
            delta_l2=float(metrics.get(wire.DELTA_L2, float("nan"))),
            bytes_sent=bytes_sent,
            delta_clipped=bool(metrics.get(wire.DELTA_CLIPPED, 0)),
            privacy=privacy,
            software_version=version_from_metrics(metrics),
        )

    def evaluate(
        self, server_round: int, global_state: dict[str, np.ndarray]
    ) -> tuple[list[SiteEvalReport], list[SiteFailure]]:
        """Every sampled site evaluates ``global_state`` on its validation split."""
        messages = list(
            self.strategy.configure_evaluate(
                server_round,
                to_record(global_state),
                ConfigRecord(
                    {
                        wire.BASE_FINGERPRINT: self.fingerprint,
                        wire.RUN_ID: self.run_id,
                        wire.SERVER_ROUND: server_round,
                    }
                ),
                self.grid,
            )
        )
        timeout = self.config.federation.round_timeout_s
        sampled = [int(m.metadata.dst_node_id) for m in messages]
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        ok, failures = _split_replies(
            replies, "evaluate", (wire.METRICS,), sent_to=sampled, timeout_s=timeout
        )
        reports = []
        for msg in ok:
            metrics = msg.content[wire.METRICS]
            node = int(msg.metadata.src_node_id)
            if wire.TRAIN_EXAMPLES in metrics:
                self.train_examples[node] = int(metrics[wire.TRAIN_EXAMPLES])
            reports.append(
                SiteEvalReport(
                    node_id=node,
                    site=self.name_of(node, int(metrics.get(wire.SITE_INDEX, -1))),
                    num_examples=int(metrics[wire.NUM_EXAMPLES]),
                    loss=float(metrics.get(wire.EVAL_LOSS, float("nan"))),
                    auroc_macro=float(metrics.get(wire.AUROC_MACRO, float("nan"))),
                    auroc_per_label={
                        label: float(
                            metrics.get(wire.AUROC_PREFIX + label, float("nan"))
                        )
                        for label in self.config.task.labels
                    },
                    metrics={
                        name: float(metrics[name])
                        for name in wire.GENERATIVE_METRICS
                        if name in metrics
                    },
                    software_version=version_from_metrics(metrics),
                )
            )
        return sorted(reports, key=lambda e: e.site), failures


_JOIN_POLL_S = 1.0
"""How often the join wait asks the grid who is connected."""
_PAUSE_POLL_S = 2.0
"""How often a paused run asks again (at most; less with a shorter join timeout)."""


@dataclass
class SiteWait:
    """Waits, before a round, until the run's sites are connected.

    Flower's strategies block in ``sample_nodes`` until ``min_available_nodes`` are
    connected, silently and for ever; this wait comes first so that the run says
    what it waits for (``status.json``, the observers) and goes ahead without
    sites that do not come.

    Parameters
    ----------
    grid
        Flower's grid; only ``get_node_ids`` is called.
    expected
        How many sites the run expects; a round waits up to ``join_timeout_s`` for
        them.
    min_sites
        Below this many connected sites the run pauses until enough are back.
    join_timeout_s
        How long a round waits for the expected sites.
    on_paused, on_resumed
        Called when the run pauses (with the reason) and when it goes on.
    name_of
        Names a node id for the logs (``index`` -1: not known before it replies).
    expected_nodes
        The node ids the run expects (enrolled sites), to name missing ones.
    """

    grid: Grid
    expected: int
    min_sites: int
    join_timeout_s: float
    on_paused: Callable[[str], None]
    on_resumed: Callable[[], None]
    name_of: Callable[[int, int], str] = lambda node, index: f"node-{node}"
    expected_nodes: tuple[int, ...] = ()
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def before_round(self, server_round: int) -> list[int]:
        """The connected node ids once the round may start (pauses while too few).

        Waits up to ``join_timeout_s`` for ``expected`` sites; goes ahead with at
        least ``min_sites``; with fewer, pauses until that many are back and then
        gives the others another ``join_timeout_s`` to follow.
        """
        while True:
            nodes = self._join()
            if len(nodes) >= self.min_sites:
                self._log_missing(server_round, nodes)
                return nodes
            self._pause_until_enough(nodes)

    def ensure_min(self) -> list[int]:
        """The connected node ids, pausing first while fewer than ``min_sites``.

        For the evaluation phase of a round: its sites were just there, so it only
        guards against Flower's silent wait, without another join timeout.
        """
        nodes = self._connected()
        if len(nodes) < self.min_sites:
            nodes = self._pause_until_enough(nodes)
        return nodes

    def _connected(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def _join(self) -> list[int]:
        deadline = self.clock() + self.join_timeout_s
        nodes = self._connected()
        while len(nodes) < self.expected:
            left = deadline - self.clock()
            if left <= 0:
                break
            self.sleep(min(_JOIN_POLL_S, left))
            nodes = self._connected()
        return nodes

    def _pause_until_enough(self, nodes: list[int]) -> list[int]:
        reason = (
            f"waiting for sites: {len(nodes)} connected, the run needs at least "
            f"{self.min_sites} (federation.min-sites)"
        )
        log.warning("run paused: %s", reason)
        self.on_paused(reason)
        # Never ask slower than a round would wait for a join (tests use tiny ones).
        interval = min(_PAUSE_POLL_S, self.join_timeout_s)
        while len(nodes) < self.min_sites:
            self.sleep(interval)
            nodes = self._connected()
        log.info("run resumed: %d site(s) connected", len(nodes))
        self.on_resumed()
        return nodes

    def _log_missing(self, server_round: int, nodes: list[int]) -> None:
        if len(nodes) >= self.expected:
            return
        missing = sorted(set(self.expected_nodes) - set(nodes))
        names = ", ".join(self.name_of(n, -1) for n in missing) or "(no roster)"
        log.warning(
            "round %d goes ahead with %d of %d expected site(s) after %gs; missing: %s",
            server_round,
            len(nodes),
            self.expected,
            self.join_timeout_s,
            names,
        )
