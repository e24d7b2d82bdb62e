"""The coordinator's round loop over adapter deltas.

Each round: Flower's strategy samples sites and builds the train messages (global
adapter *weights* + round config); sites reply with *deltas*; the coordinator
takes their example-weighted mean and steps the global adapter; then every
sampled site evaluates the new global adapter on its own validation split.

Before each round the coordinator waits for the run's sites (and pauses while
fewer than min-sites are connected); ``status.json`` in the run directory says
what the run is doing. With ``output.resume`` a run continues from its last
intact checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.serverapp import Grid

from ..common import wire
from ..common.adapter import (
    adapter_sha256,
    adapter_state,
    num_bytes,
    payload_keys,
    save_peft_adapter,
)
from ..common.aggregation import apply_delta, weighted_metric_mean
from ..common.config import LoraVariant, RunConfig, Strategy
from ..common.errors import (
    ConfigError,
    FederationError,
    PrivacyBudgetExhausted,
    WardroundError,
)
from ..common.models import build_model
from ..common.models.registry import describe
from .phases import RoundPhases, SiteWait
from .plots import plot_privacy, plot_rounds
from .records import RoundRecord, SiteEvalReport, SiteFailure, SiteTrainReport
from .rundir import RunDirectory, RunStart, RunState, versions
from .strategy import make_strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """Who a run is, as it starts (or resumes)."""

    run_id: str
    rounds: int
    """``federation.rounds``: the last round of the run."""
    expected_sites: int
    """How many sites each round waits for (see :func:`expected_site_count`)."""
    resumed_from_round: int | None
    """The round this call continues after; None when it starts at round 0."""
    config: RunConfig


class RoundObserver(Protocol):
    """Receives progress (the CLI's progress display, logs, the audit log).

    Only ``on_start`` and ``on_round`` are required: the other hooks are skipped
    for an observer that lacks them (their bodies here are the no-op defaults of
    a class that subclasses this protocol).
    """

    def on_start(self, total_rounds: int) -> None:
        """The run is about to start; ``total_rounds`` rounds are left to train."""

    def on_round(self, record: RoundRecord) -> None:
        """A round finished (its line and manifest are written)."""

    def on_run_started(self, info: RunInfo) -> None:
        """The run started or resumed; called before ``on_start``."""

    def on_round_started(self, server_round: int, sampled: list[int]) -> None:
        """The strategy sampled these node ids to train in ``server_round``."""

    def on_round_incomplete(
        self, server_round: int, failures: list[SiteFailure]
    ) -> None:
        """Too few sites trained in ``server_round``: these failed; the run stops."""

    def on_paused(self, reason: str) -> None:
        """Too few sites are connected: the run waits for them."""

    def on_resumed(self) -> None:
        """Enough sites are back: the run goes on."""

    def on_finished(self, state: str, reason: str | None) -> None:
        """The run ended: ``state`` is 'finished', 'stopped' or 'failed'."""


class ObserverGroup:
    """Several observers as one; an observer's missing hooks are skipped.

    The CLI's progress display only has ``on_start`` and ``on_round``; the audit
    observer has them all.
    """

    def __init__(self, *observers: RoundObserver | None) -> None:
        self.observers = [o for o in observers if o is not None]

    def _call(self, hook: str, *args: Any) -> None:
        for observer in self.observers:
            method = getattr(observer, hook, None)
            if method is not None:
                method(*args)

    def on_start(self, total_rounds: int) -> None:
        """See :meth:`RoundObserver.on_start`."""
        self._call("on_start", total_rounds)

    def on_round(self, record: RoundRecord) -> None:
        """See :meth:`RoundObserver.on_round`."""
        self._call("on_round", record)

    def on_run_started(self, info: RunInfo) -> None:
        """See :meth:`RoundObserver.on_run_started`."""
        self._call("on_run_started", info)

    def on_round_started(self, server_round: int, sampled: list[int]) -> None:
        """See :meth:`RoundObserver.on_round_started`."""
        self._call("on_round_started", server_round, sampled)

    def on_round_incomplete(
        self, server_round: int, failures: list[SiteFailure]
    ) -> None:
        """See :meth:`RoundObserver.on_round_incomplete`."""
        self._call("on_round_incomplete", server_round, failures)

    def on_paused(self, reason: str) -> None:
        """See :meth:`RoundObserver.on_paused`."""
        self._call("on_paused", reason)

    def on_resumed(self) -> None:
        """See :meth:`RoundObserver.on_resumed`."""
        self._call("on_resumed")

    def on_finished(self, state: str, reason: str | None) -> None:
        """See :meth:`RoundObserver.on_finished`."""
        self._call("on_finished", state, reason)


@dataclass
class FederationResult:
    """What a finished run produced."""

    run_dir: Path
    rounds: list[RoundRecord]
    summary: dict[str, Any]


def _default_name(node_id: int, index: int) -> str:
    return f"site-{index + 1:02d}" if index >= 0 else f"node-{node_id}"


def expected_site_count(config: RunConfig, expected_nodes: Collection[int] = ()) -> int:
    """How many sites each round waits for before it starts.

    ``federation.expected-sites`` when set, else the number of ``expected_nodes``
    (a coordinator's enrolled sites); never fewer than ``federation.min-sites``.
    """
    wanted = config.federation.expected_sites or len(expected_nodes)
    return max(wanted, config.federation.min_sites)


def run_federation(
    grid: Grid,
    config: RunConfig,
    *,
    run_dir: Path,
    site_names: Callable[[int, int], str] | None = None,
    observer: RoundObserver | None = None,
    run_id: str | None = None,
    expected_nodes: Collection[int] = (),
) -> FederationResult:
    """Run ``config.federation.rounds`` rounds and write the run directory.

    Parameters
    ----------
    grid
        Flower's grid to the sites.
    config
        The run config; with ``output.resume`` the run in ``run_dir`` continues
        from its last intact checkpoint (same run id, same config but ``output``).
    run_dir
        The run directory (see :mod:`wardround.server.rundir`).
    site_names
        ``(node id, site index) -> name`` for records; index -1 when unknown.
    observer
        Progress hooks (:class:`RoundObserver`; :class:`ObserverGroup` for several).
    run_id
        The run's id for a new run (the sites' privacy ledgers use it); a resumed
        run keeps the id it started with.
    expected_nodes
        Node ids the run expects (a coordinator's enrolled sites): with
        ``federation.expected-sites`` = 0 each round waits for this many, and the
        log names the missing ones.

    Raises
    ------
    FederationError, PrivacyBudgetExhausted
        A round could not complete; the run directory holds every completed round.
    ConfigError
        ``output.resume`` with a config that differs from the run's.
    """
    name_of = site_names or _default_name
    built = build_model(config)
    initial = adapter_state(built.model)
    out = RunDirectory(run_dir, config)
    try:
        start = out.open_run(initial, run_id)
    except ConfigError as exc:
        # Say it in status.json too: `wardround launch` follows the run there.
        prior = (out.read_run_state() or {}).get("run_id") or run_id
        out.write_status(
            RunState.FAILED, server_round=0, run_id=prior, reason=exc.message
        )
        raise
    run = _Run(
        grid,
        config,
        out,
        start,
        built,
        state=dict(start.point.state) if start.point else initial,
        name_of=name_of,
        events=ObserverGroup(observer),
        expected_nodes=expected_nodes,
    )
    try:
        stopped = run.play()
        result = run.finish(stopped)
    except BaseException as exc:
        run.abort(exc)
        raise
    if stopped is not None:
        raise type(stopped)(
            f"{stopped.message}\nThe run directory {run_dir} holds the "
            f"{len(result.rounds) - 1} completed round(s).",
            hint=stopped.hint,
        )
    return result


class _Run:
    """One call of :func:`run_federation`: its state between the rounds."""

    def __init__(
        self,
        grid: Grid,
        config: RunConfig,
        out: RunDirectory,
        start: RunStart,
        built: Any,
        *,
        state: dict[str, np.ndarray],
        name_of: Callable[[int, int], str],
        events: ObserverGroup,
        expected_nodes: Collection[int],
    ) -> None:
        self.config, self.out, self.start, self.built = config, out, start, built
        self.events = events
        self.state = state
        self.records: list[RoundRecord] = (
            list(start.point.records) if start.point else []
        )
        self.current_round = start.point.round if start.point else 0
        keys = payload_keys(
            self.state,
            frozen_lora_a=config.model.lora_variant is LoraVariant.FFA,
            personal=config.federation.personal,
        )
        self.phases = RoundPhases(
            strategy=make_strategy(config.federation),
            grid=grid,
            config=config,
            fingerprint=built.base_fingerprint,
            name_of=name_of,
            run_id=start.run_id,
            payload_shapes={k: tuple(self.state[k].shape) for k in keys},
            on_sampled=events.on_round_started,
            on_incomplete=events.on_round_incomplete,
        )
        # A resumed run skips round 0's evaluation, which tells SecAgg+ the sites'
        # training-set sizes: its records tell the same.
        for record in self.records:
            for report in record.train:
                self.phases.train_examples[report.node_id] = report.num_examples
        self.wait = SiteWait(
            grid=grid,
            expected=expected_site_count(config, expected_nodes),
            min_sites=config.federation.min_sites,
            join_timeout_s=config.federation.join_timeout_s,
            on_paused=self._paused,
            on_resumed=self._resumed,
            name_of=name_of,
            expected_nodes=tuple(sorted(expected_nodes)),
        )

    @property
    def run_id(self) -> str:
        """The run's id (kept when resumed)."""
        return self.start.run_id

    def status(self, state: RunState, reason: str | None = None) -> None:
        """Write ``status.json`` for the current round."""
        self.out.write_status(
            state, server_round=self.current_round, run_id=self.run_id, reason=reason
        )

    def _paused(self, reason: str) -> None:
        self.status(RunState.PAUSED, reason)
        self.events.on_paused(reason)

    def _resumed(self) -> None:
        self.status(RunState.RUNNING)
        self.events.on_resumed()

    # -- the rounds --------------------------------------------------------------
    def play(self) -> WardroundError | None:
        """Run the rounds left; the error that stopped the run, if one did."""
        point = self.start.point
        self.status(RunState.STARTING)
        self.events.on_run_started(
            RunInfo(
                run_id=self.run_id,
                rounds=self.config.federation.rounds,
                expected_sites=self.wait.expected,
                resumed_from_round=point.round if point else None,
                config=self.config,
            )
        )
        first = point.round + 1 if point else 1
        self.events.on_start(self.config.federation.rounds - first + 1)
        if point is None:
            stopped = self._round_zero()
            if stopped is not None:
                return stopped
        for server_round in range(first, self.config.federation.rounds + 1):
            stopped = self._round(server_round)
            if stopped is not None:
                return stopped
        return None

    def _round_zero(self) -> WardroundError | None:
        """Every site evaluates the initial adapter: the baseline rounds improve on."""
        self.status(RunState.RUNNING)
        self.wait.before_round(0)
        start = time.perf_counter()
        evals, failures = self.phases.evaluate(0, self.state)
        record = _record(
            0,
            [],
            evals,
            failures,
            adapter_sha256(self.state),
            time.perf_counter() - start,
            0.0,
        )
        self._write(record)
        return self._enough_evaluated(record)

    def _round(self, server_round: int) -> WardroundError | None:
        self.current_round = server_round
        self.status(RunState.RUNNING)
        self.wait.before_round(server_round)
        round_start = time.perf_counter()
        try:
            phase = self.phases.train(server_round, self.state)
        except (FederationError, PrivacyBudgetExhausted) as exc:
            # Keep every completed round: the run directory is written, then reported.
            log.error("run stopped in round %d: %s", server_round, exc.message)
            return exc
        self.state = apply_delta(self.state, phase.mean_delta)
        self.wait.ensure_min()
        evals, eval_failures = self.phases.evaluate(server_round, self.state)
        record = _record(
            server_round,
            phase.reports,
            evals,
            phase.failures + eval_failures,
            adapter_sha256(self.state),
            time.perf_counter() - round_start,
            phase.aggregation_seconds,
            aggregation=phase.aggregation.value,
            secure_aggregation=phase.secure_aggregation,
        )
        self._write(record)
        if self._checkpoint_due(server_round):
            self.out.write_checkpoint(server_round, self.state, record.adapter_sha256)
        self.status(RunState.RUNNING)
        self.events.on_round(record)
        if "generative" in record.extra:
            log.info(
                "round %d: global validation loss %.4f, perplexity %.2f",
                server_round,
                record.global_loss,
                record.extra["generative"][wire.EVAL_PERPLEXITY],
            )
        else:
            log.info(
                "round %d: global AUROC %.3f, loss %.4f",
                server_round,
                record.global_auroc,
                record.global_loss,
            )
        return self._enough_evaluated(record)

    def _write(self, record: RoundRecord) -> None:
        self.records.append(record)
        self.out.write_round(
            record, _manifest(self.config, self.built.base_fingerprint, record)
        )

    def _enough_evaluated(self, record: RoundRecord) -> WardroundError | None:
        try:
            self.phases.require_evaluated(
                record.round, record.evaluate, record.failures
            )
        except FederationError as exc:
            log.error("run stopped after round %d: %s", record.round, exc.message)
            return exc
        return None

    def _checkpoint_due(self, server_round: int) -> bool:
        every = self.config.output.checkpoint_every
        return bool(every) and (
            server_round % every == 0 or server_round == self.config.federation.rounds
        )

    # -- the end -----------------------------------------------------------------
    def finish(self, stopped: WardroundError | None) -> FederationResult:
        """Write the adapter, plots, run.json and the final status."""
        last = self.records[-1]
        if (
            stopped is not None
            and last.round > 0
            and self.config.output.checkpoint_every
            and not self._checkpoint_due(last.round)
        ):
            # A stopped run may be resumed: keep its last round resumable.
            self.out.write_checkpoint(last.round, self.state, last.adapter_sha256)
        run_dir = self.out.root
        save_peft_adapter(self.built.model, self.state, run_dir / "adapter")
        plot_rounds(self.records, run_dir / "plots")
        plot_privacy(self.records, run_dir / "plots")
        summary = _summary(
            self.config,
            self.records,
            describe(self.built),
            self.start,
            self.built.base_fingerprint,
            self.state,
            payload=self.phases.payload_shapes,
            stopped=stopped,
        )
        self.out.write_final(summary)
        state = RunState.FINISHED if stopped is None else RunState.STOPPED
        reason = None if stopped is None else stopped.message
        self.status(state, reason)
        self.events.on_finished(state.value, reason)
        return FederationResult(run_dir=run_dir, rounds=self.records, summary=summary)

    def abort(self, exc: BaseException) -> None:
        """Record an unexpected end; never raises, so ``exc`` is what propagates."""
        if not isinstance(exc, Exception):
            # SystemExit, KeyboardInterrupt, Flower's RunNotRunningException: the
            # ServerApp was stopped from outside (an admin's stop, a coordinator
            # restart). status.json stays as it was: whoever stopped the run says
            # why, and a coordinator restart resumes runs that have not ended.
            log.warning(
                "run %s interrupted in round %d (%s)",
                self.run_id,
                self.current_round,
                type(exc).__name__,
            )
            return
        reason = (
            f"{type(exc).__name__}: {exc.message}"
            if isinstance(exc, WardroundError)
            else f"{type(exc).__name__}: {str(exc)[:500]}"
        )
        try:
            self.status(RunState.FAILED, reason)
            self.events.on_finished(RunState.FAILED.value, reason)
        except Exception as during:  # the original error is the one to report
            log.error("could not record the failure of run %s: %s", self.run_id, during)


def _record(
    server_round: int,
    train: list[SiteTrainReport],
    evals: list[SiteEvalReport],
    failures: list[SiteFailure],
    sha: str,
    seconds: float,
    aggregation_seconds: float,
    *,
    aggregation: str = "none",
    secure_aggregation: dict[str, Any] | None = None,
) -> RoundRecord:
    return RoundRecord(
        round=server_round,
        train=train,
        evaluate=evals,
        failures=failures,
        global_auroc=weighted_metric_mean(
            [e.auroc_macro for e in evals], [e.num_examples for e in evals]
        ),
        global_loss=weighted_metric_mean(
            [e.loss for e in evals], [e.num_examples for e in evals]
        ),
        train_loss=weighted_metric_mean(
            [t.loss for t in train], [t.num_examples for t in train]
        ),
        adapter_sha256=sha,
        seconds=seconds,
        aggregation_seconds=aggregation_seconds,
        aggregation=aggregation,
        secure_aggregation=secure_aggregation,
        extra=_generative_extra(evals),
    )


def _generative_extra(evals: list[SiteEvalReport]) -> dict[str, Any]:
    """Global generative scores (vlm family), or nothing for a classifier.

    Perplexity is weighted by each site's validation examples; the generation
    scores by the examples each site generated for.
    """
    if not any(e.metrics for e in evals):
        return {}
    generated = [e.metrics.get(wire.EVAL_GENERATED, 0.0) for e in evals]
    scores: dict[str, float] = {}
    for name in wire.GENERATIVE_METRICS:
        if name == wire.EVAL_GENERATED:
            scores[name] = float(sum(generated))
            continue
        weights = [
            e.num_examples if name == wire.EVAL_PERPLEXITY else g
            for e, g in zip(evals, generated, strict=True)
        ]
        values = [e.metrics.get(name, float("nan")) for e in evals]
        scores[name] = weighted_metric_mean(values, weights)
    return {"generative": scores}


def _dp_settings(config: RunConfig) -> dict[str, Any] | None:
    if not config.privacy.enabled:
        return None
    return config.privacy.model_dump(mode="json", by_alias=True)


def privacy_by_site(records: list[RoundRecord]) -> dict[str, dict[str, Any]]:
    """Each site's latest privacy accounting and its per-round history."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        for report in record.train:
            if report.privacy is None:
                continue
            entry = out.setdefault(report.site, {"per_round": []})
            entry.update(asdict(report.privacy))
            entry["per_round"].append(
                {
                    "round": record.round,
                    "epsilon_run": report.privacy.epsilon_run,
                    "epsilon_run_prv": report.privacy.epsilon_run_prv,
                    "epsilon_total": report.privacy.epsilon_total,
                }
            )
    return out


def bytes_by_site(records: Iterable[RoundRecord]) -> dict[str, int]:
    """Bytes each site sent over these rounds (also those reloaded on resuming)."""
    sent: dict[str, int] = {}
    for record in records:
        for report in record.train:
            sent[report.site] = sent.get(report.site, 0) + report.bytes_sent
    return sent


def _manifest(
    config: RunConfig, fingerprint: str, record: RoundRecord
) -> dict[str, Any]:
    return {
        "round": record.round,
        "participants": [
            {"node_id": t.node_id, "site": t.site, "num_examples": t.num_examples}
            for t in record.train
        ],
        "failures": [{"node_id": f.node_id, "phase": f.phase} for f in record.failures],
        "strategy": config.federation.strategy.value,
        # what the strategy sent: FedAvg sends no mu
        "proximal_mu": (
            config.federation.proximal_mu
            if config.federation.strategy is Strategy.FEDPROX
            else 0.0
        ),
        "lora_variant": config.model.lora_variant.value,
        "delta_clip_norm": config.federation.delta_clip_norm,
        "aggregation": record.aggregation,
        "differential_privacy": _dp_settings(config),
        "privacy_spent": {
            t.site: asdict(t.privacy) for t in record.train if t.privacy is not None
        },
        "secure_aggregation": record.secure_aggregation,
        "base_model_fingerprint": fingerprint,
        "adapter_sha256": record.adapter_sha256,
        "versions": versions(),
    }


def _summary(
    config: RunConfig,
    records: list[RoundRecord],
    model_info: dict[str, Any],
    start: RunStart,
    fingerprint: str,
    state: dict[str, np.ndarray],
    *,
    payload: Iterable[str],
    stopped: WardroundError | None,
) -> dict[str, Any]:
    payload = list(payload)
    last = records[-1]
    trained = records[1:]
    resumed = start.resumed_from
    return {
        "run_id": start.run_id,
        "status": "completed" if stopped is None else f"stopped: {stopped.title}",
        "stop_reason": None if stopped is None else stopped.message,
        "resumed_from_round": (
            None if not resumed else resumed[0] if len(resumed) == 1 else resumed
        ),
        "config": config.model_dump(mode="json", by_alias=True),
        "model": {
            **model_info,
            "adapter_tensors": len(state),
            "adapter_payload_tensors": len(payload),
            "adapter_payload_bytes": num_bytes({k: state[k] for k in payload}),
            "base_model_fingerprint": fingerprint,
        },
        "aggregation": sorted({r.aggregation for r in trained}) or ["none"],
        "differential_privacy": _dp_settings(config),
        "rounds_completed": len(records) - 1,
        "final": {
            "global": {
                "auroc_macro": last.global_auroc,
                "loss": last.global_loss,
                **last.extra.get("generative", {}),
            },
            "sites": {
                e.site: {
                    "auroc_macro": e.auroc_macro,
                    "loss": e.loss,
                    "num_examples": e.num_examples,
                    "auroc_per_label": e.auroc_per_label,
                    **e.metrics,
                }
                for e in last.evaluate
            },
        },
        "history": {
            "global_auroc": [r.global_auroc for r in records],
            "global_loss": [r.global_loss for r in records],
            **(
                {"global_generative": [r.extra.get("generative") for r in records]}
                if "generative" in last.extra
                else {}
            ),
        },
        "bytes_sent_per_site": bytes_by_site(records),
        "privacy_spent": privacy_by_site(records),
        "timings": {
            # since the run first started, downtime before a resumption included
            "started": start.started,
            "finished": time.time(),
            "wall_seconds": time.time() - start.started,
            "round_seconds": [r.seconds for r in records],
            "aggregation_seconds": [r.aggregation_seconds for r in records],
        },
        "versions": versions(),
    }
