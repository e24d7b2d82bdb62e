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
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from ..common import wire
from ..common.adapter import (
    adapter_sha256,
    adapter_state,
    payload_keys,
)
from ..common.aggregation import apply_delta
from ..common.config import LoraVariant, RunConfig
from ..common.errors import (
    ConfigError,
    FederationError,
    PrivacyBudgetExhausted,
    PrivacyPolicyRefused,
    WardroundError,
)
from ..models import build_model
from ..models.adapter_files import save_peft_adapter
from ..models.registry import describe
from .observers import ObserverGroup, RoundObserver, RunInfo
from .phases import RoundPhases, TrainPhase
from .plots import plot_privacy, plot_rounds
from .records import RoundRecord, SiteEvalReport, SiteFailure
from .replies import reasons
from .retries import RoundRetries
from .run_report import clip_advice, manifest, round_record, summary
from .rundir import RunDirectory, RunStart, RunState
from .site_wait import SiteWait
from .strategies import make_strategy

__all__ = [
    "FederationResult",
    "ObserverGroup",
    "RoundObserver",
    "RunInfo",
    "expected_site_count",
    "run_federation",
]

log = logging.getLogger(__name__)


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
    asks_again: bool = True,
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
    asks_again
        Whether a round left short by sites that went away is asked again once
        they are back (``federation.round-retries``; see
        :mod:`wardround.server.retries`). A simulation's sites never go away.

    Raises
    ------
    FederationError, PrivacyBudgetExhausted, PrivacyPolicyRefused
        A round could not complete (the last two: the sites' privacy budgets or
        floors refused it); the run directory holds every completed round.
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
        asks_again=asks_again,
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
        asks_again: bool,
    ) -> None:
        self.config, self.out, self.start, self.built = config, out, start, built
        self.events = events
        self.state = state
        self.records: list[RoundRecord] = (
            list(start.point.records) if start.point else []
        )
        self.current_round = start.point.round if start.point else 0
        self._clip_advised = False
        keys = payload_keys(
            self.state,
            frozen_lora_a=config.model.lora_variant is LoraVariant.FFA,
            personal=config.federation.personal,
        )
        self.strategy = make_strategy(config.federation, config.secure_aggregation)
        self.phases = RoundPhases(
            strategy=self.strategy,
            grid=grid,
            config=config,
            fingerprint=built.base_fingerprint,
            name_of=name_of,
            run_id=start.run_id,
            payload_shapes={k: tuple(self.state[k].shape) for k in keys},
            on_sampled=events.on_round_started,
        )
        self.retries = RoundRetries.resuming(config, self.records, enabled=asks_again)
        # A resumed run skips round 0's evaluation, which tells SecAgg+ the sites'
        # training-set sizes: its records tell the same.
        for record in self.records:
            for report in record.train:
                self.strategy.note_train_examples(report.node_id, report.num_examples)
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
        self.retries.start_round()
        start = time.perf_counter()
        evals, failures = self._evaluate(0)
        record = round_record(
            0,
            [],
            evals,
            failures,
            adapter_sha256(self.state),
            time.perf_counter() - start,
            0.0,
            asked_again=self.retries.asked_again,
        )
        self._write(record)
        return self._enough_evaluated(record)

    def _round(self, server_round: int) -> WardroundError | None:
        self.current_round = server_round
        self.status(RunState.RUNNING)
        self.wait.before_round(server_round)
        self.retries.start_round()
        round_start = time.perf_counter()
        phase = self._train(server_round)
        if not isinstance(phase, TrainPhase):
            # Keep every completed round: the run directory is written, then reported.
            log.error("run stopped in round %d: %s", server_round, phase.message)
            return phase
        trained_at = time.perf_counter()
        self.state = apply_delta(self.state, phase.mean_delta)
        # The mean is in the state now: a large adapter's copy goes before evaluation.
        phase = replace(phase, mean_delta={})
        self.wait.ensure_min()
        evaluate_start = time.perf_counter()
        evals, eval_failures = self._evaluate(server_round)
        phase_seconds = {
            "train": trained_at - round_start,
            "evaluate": time.perf_counter() - evaluate_start,
        }
        record = round_record(
            server_round,
            phase.reports,
            evals,
            phase.failures + eval_failures,
            adapter_sha256(self.state),
            time.perf_counter() - round_start,
            phase.aggregation_seconds,
            aggregation=phase.aggregation.value,
            secure_aggregation=phase.secure_aggregation,
            phase_seconds=phase_seconds,
            asked_again=self.retries.asked_again,
        )
        self._write(record)
        # Once a run, and not under DP-SGD, where a delta is mostly noise and a
        # bound that limits it is expected.
        if not self._clip_advised and not self.config.privacy.enabled:
            advice = clip_advice(record, self.config.federation.delta_clip_norm)
            if advice:
                self._clip_advised = True
                log.warning("%s", advice)
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
                "round %d: %s %.3f, loss %.4f",
                server_round,
                # each site evaluates its own modules or model: no one global model
                "AUROC of the sites' personalised models"
                if self.config.federation.personalised
                else "global AUROC",
                record.global_auroc,
                record.global_loss,
            )
        return self._enough_evaluated(record)

    def _train(self, server_round: int) -> TrainPhase | WardroundError:
        """The round's training phase, asked again while sites went away from it.

        The error that stops the run when too few sites trained in the end.
        """
        asked = 1
        while True:
            try:
                phase = self.phases.train(server_round, self.state)
            except (
                FederationError,
                PrivacyBudgetExhausted,
                PrivacyPolicyRefused,
            ) as exc:
                return exc  # e.g. a site revoked between sampling and sending
            if isinstance(phase, TrainPhase):
                return phase
            why_not = self.retries.why_not(
                "train", phase.failures, phase.trained, asked
            )
            if why_not is None:
                self._ask_again(server_round, "train", phase.failures, asked)
                asked += 1
                continue
            if why_not:
                log.warning("round %d is not asked again: %s", server_round, why_not)
            # The round leaves no record: say who failed in it before the run stops.
            self.events.on_round_incomplete(server_round, phase.failures)
            return self.phases.stop_short(server_round, phase, asked, why_not)

    def _evaluate(
        self, server_round: int
    ) -> tuple[list[SiteEvalReport], list[SiteFailure]]:
        """The sites' evaluations, asking again those that went away, while too few."""
        evals, failures = self.phases.evaluate(server_round, self.state)
        asked = 1
        while len(evals) < self.config.federation.min_sites:
            why_not = self.retries.why_not("evaluate", failures, len(evals), asked)
            if why_not is not None:
                if why_not:
                    log.warning(
                        "round %d's evaluation is not asked again: %s",
                        server_round,
                        why_not,
                    )
                break
            self._ask_again(server_round, "evaluate", failures, asked)
            asked += 1
            done = frozenset(e.node_id for e in evals)
            more, failures = self.phases.evaluate(server_round, self.state, done)
            evals = sorted([*evals, *more], key=lambda e: e.site)
        return evals, failures

    def _ask_again(
        self, server_round: int, phase: str, failures: list[SiteFailure], asked: int
    ) -> None:
        """Say why ``phase``, asked ``asked`` times, is asked again; wait for sites."""
        self.retries.note(phase, failures)
        gone = [f for f in failures if f.went_away]
        log.warning(
            "round %d: too few sites %s (%d went away: %s); asking again (%d of at "
            "most %d) once federation.min-sites=%d are connected",
            server_round,
            "trained" if phase == "train" else "evaluated",
            len(gone),
            reasons(gone, self.phases.name_of),
            asked,
            self.config.federation.round_retries,
            self.config.federation.min_sites,
        )
        self.events.on_round_repeated(server_round, phase, failures)
        self.wait.before_round(server_round)

    def _write(self, record: RoundRecord) -> None:
        self.records.append(record)
        self.out.write_round(
            record,
            manifest(
                self.config,
                self.built.base_fingerprint,
                record,
                self.strategy.manifest_settings(),
            ),
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
        report = summary(
            self.config,
            self.records,
            describe(self.built),
            self.start,
            self.built.base_fingerprint,
            self.state,
            payload=self.phases.payload_shapes,
            stopped=stopped,
        )
        self.out.write_final(report)
        state = RunState.FINISHED if stopped is None else RunState.STOPPED
        reason = None if stopped is None else stopped.message
        self.status(state, reason)
        self.events.on_finished(state.value, reason)
        return FederationResult(run_dir=run_dir, rounds=self.records, summary=report)

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
