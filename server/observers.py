"""Who hears of a run's progress: the CLI's progress display, the logs, the audit log.

:class:`RoundObserver` is the set of hooks; :class:`ObserverGroup` makes several
observers one, skipping the hooks an observer lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..common.config import RunConfig
from .records import RoundRecord, SiteFailure


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

    def on_round_repeated(
        self, server_round: int, phase: str, failures: list[SiteFailure]
    ) -> None:
        """Sites that went away left a phase ('train', 'evaluate') of a round short.

        ``failures``: who failed in it; the phase is asked again.
        """

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

    def on_round_repeated(
        self, server_round: int, phase: str, failures: list[SiteFailure]
    ) -> None:
        """See :meth:`RoundObserver.on_round_repeated`."""
        self._call("on_round_repeated", server_round, phase, failures)

    def on_paused(self, reason: str) -> None:
        """See :meth:`RoundObserver.on_paused`."""
        self._call("on_paused", reason)

    def on_resumed(self) -> None:
        """See :meth:`RoundObserver.on_resumed`."""
        self._call("on_resumed")

    def on_finished(self, state: str, reason: str | None) -> None:
        """See :meth:`RoundObserver.on_finished`."""
        self._call("on_finished", state, reason)
