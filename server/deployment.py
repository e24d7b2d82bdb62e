"""The ServerApp on a coordinator: enrolled sites' names, who to wait for, the audit log.

The coordinator daemon sets ``WARDROUND_COORDINATOR_STATE`` to its state folder for
the SuperLink, and Flower's ``flwr-serverapp`` subprocess inherits it. There the
ServerApp names sites from ``<state>/sites.json`` (written by ``wardround sites
add``), expects every enrolled site that is not revoked, and records what the run
does in ``<state>/audit.jsonl`` as the ``coordinator``.

The audit log holds operational facts only: ids, site names, counts, bytes,
epsilons, AUROCs, durations and controlled reasons; never a site's data, and
never a site's error text unless squeezed by :func:`safe_reason`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..common.config import RunConfig
from ..ops.audit import AUDIT_FILENAME, AuditLog, safe_reason
from .coordinator import STATE_ENV
from .observers import RunInfo
from .records import RoundRecord, SiteFailure
from .registry import EnrolledSite, load_sites

log = logging.getLogger(__name__)

SITES_FILE = "sites.json"
AUDIT_ACTOR = "coordinator"
REFUSALS = frozenset(
    {
        "PrivacyBudgetExhausted",
        "PrivacyPolicyRefused",
        "ModelMismatchError",
        "EgressViolation",
    }
)
"""Failure kinds that mean the site refused the round (the rest: it left it)."""


class AuditRecorder(Protocol):
    """What the observer writes to: :class:`~wardround.ops.audit.AuditLog`."""

    def record(self, event: str, **fields: Any) -> Any:
        """Append one event with its fields."""


class SiteRoster:
    """The enrolled sites of ``sites.json`` by node id; re-read when the file changes.

    A site enrolled while a run goes on gets its name at its first reply.

    Parameters
    ----------
    path
        ``<state>/sites.json``; a missing file means no site is enrolled yet.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._by_node: dict[int, EnrolledSite] = {}

    def sites(self) -> dict[int, EnrolledSite]:
        """Every enrolled site (revoked ones too) by Flower node id."""
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._by_node = {
                site.node_id: site for site in load_sites(self.path).values()
            }
            self._stamp = stamp
        return self._by_node

    def name(self, node_id: int, index: int = -1) -> str:
        """The site's enrolled name; ``node-<id>`` for a node not in the file.

        ``index`` (the site's partition in a simulation) is not used: a deployed
        site is known by the key it connects with, that is by its node id.
        """
        site = self.sites().get(int(node_id))
        return site.name if site is not None else f"node-{node_id}"

    def expected_nodes(self) -> list[int]:
        """Node ids of the enrolled sites that are not revoked."""
        return sorted(n for n, site in self.sites().items() if site.active)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class AuditObserver:
    """Records a run's events in the audit log (a :class:`RoundObserver`).

    Parameters
    ----------
    recorder
        The audit log (or a stand-in with the same ``record``).
    name_of
        ``(node id, index) -> site name``, as the records name sites.
    """

    def __init__(
        self, recorder: AuditRecorder, name_of: Callable[[int, int], str]
    ) -> None:
        self.recorder = recorder
        self.name_of = name_of
        self.run_id = "unknown"
        self.round = 0
        self._seen: set[int] = set()

    def on_run_started(self, info: RunInfo) -> None:
        """``run_started``: the run's settings that matter for an audit."""
        self.run_id = info.run_id
        self.round = info.resumed_from_round or 0
        config = info.config
        self.recorder.record(
            "run_started",
            run_id=info.run_id,
            rounds=info.rounds,
            strategy=config.federation.strategy.value,
            dp=config.privacy.enabled,
            target_epsilon=(
                config.privacy.target_epsilon if config.privacy.enabled else None
            ),
            secagg=config.secure_aggregation.enabled,
            expected_sites=info.expected_sites,
            resumed_from_round=info.resumed_from_round,
        )

    def on_start(self, total_rounds: int) -> None:
        """Nothing to record: ``on_run_started`` did."""

    def on_round_started(self, server_round: int, sampled: list[int]) -> None:
        """``site_joined`` for sites new to this run, then ``round_started``."""
        self.round = server_round
        for node in sampled:
            if node not in self._seen:
                self._seen.add(node)
                self.recorder.record(
                    "site_joined",
                    run_id=self.run_id,
                    round=server_round,
                    site=self.name_of(node, -1),
                )
        self.recorder.record(
            "round_started",
            run_id=self.run_id,
            round=server_round,
            sites_sampled=len(sampled),
        )

    def on_round(self, record: RoundRecord) -> None:
        """``site_left`` / ``site_refused`` per failure, then ``round_finished``."""
        for failure in record.failures:
            self._failure(record.round, failure)
        self.recorder.record(
            "round_finished",
            run_id=self.run_id,
            round=record.round,
            sites=[t.site for t in record.train],
            bytes_by_site={t.site: t.bytes_sent for t in record.train},
            epsilon_by_site=_epsilons(record),
            global_auroc=_finite(record.global_auroc),
            seconds=round(record.seconds, 3),
        )

    def on_round_incomplete(
        self, server_round: int, failures: list[SiteFailure]
    ) -> None:
        """``site_left`` / ``site_refused`` for the sites of a round that stops the run."""
        for failure in failures:
            self._failure(server_round, failure)

    def on_round_repeated(
        self, server_round: int, phase: str, failures: list[SiteFailure]
    ) -> None:
        """``site_left`` / ``site_refused`` per failure, then ``round_repeated``."""
        for failure in failures:
            self._failure(server_round, failure)
        self.recorder.record(
            "round_repeated",
            run_id=self.run_id,
            round=server_round,
            phase=phase,
            sites_gone=[self.name_of(f.node_id, -1) for f in failures if f.went_away],
        )

    def _failure(self, server_round: int, failure: SiteFailure) -> None:
        refused = failure.kind in REFUSALS
        self.recorder.record(
            "site_refused" if refused else "site_left",
            run_id=self.run_id,
            round=server_round,
            site=self.name_of(failure.node_id, -1),
            phase=failure.phase,
            kind=failure.kind,
            reason=safe_reason(failure.reason),
        )

    def on_paused(self, reason: str) -> None:
        """``run_paused`` with why."""
        self.recorder.record(
            "run_paused",
            run_id=self.run_id,
            round=self.round,
            reason=safe_reason(reason),
        )

    def on_resumed(self) -> None:
        """``run_resumed``: enough sites are back."""
        self.recorder.record("run_resumed", run_id=self.run_id, round=self.round)

    def on_finished(self, state: str, reason: str | None) -> None:
        """``run_finished``, or ``run_stopped`` (with its state and reason)."""
        if state == "finished":
            self.recorder.record("run_finished", run_id=self.run_id, round=self.round)
            return
        self.recorder.record(
            "run_stopped",
            run_id=self.run_id,
            round=self.round,
            state=state,
            reason=safe_reason(reason or state),
        )


def _epsilons(record: RoundRecord) -> dict[str, float]:
    """Epsilon each site has spent on this run so far (DP runs only)."""
    return {
        t.site: t.privacy.epsilon_run
        for t in record.train
        if t.privacy is not None and math.isfinite(t.privacy.epsilon_run)
    }


@dataclass(frozen=True)
class Deployment:
    """What the ServerApp takes from the coordinator's state folder."""

    state_dir: Path
    roster: SiteRoster
    observer: AuditObserver

    @classmethod
    def open(cls, state_dir: Path, recorder: AuditRecorder | None = None) -> Deployment:
        """The deployment of the coordinator whose state folder is ``state_dir``."""
        state_dir = Path(state_dir)
        roster = SiteRoster(state_dir / SITES_FILE)
        recorder = recorder or AuditLog(state_dir / AUDIT_FILENAME, actor=AUDIT_ACTOR)
        return cls(state_dir, roster, AuditObserver(recorder, roster.name))

    def run_id(self, config: RunConfig) -> str:
        """The run's id: its folder's name, the name ``wardround launch`` gave it.

        The admin's and the coordinator's audit lines use that name, so one id
        finds all of a run's lines.
        """
        return Path(config.output.dir).name


def deployment_from_env(environ: Mapping[str, str] | None = None) -> Deployment | None:
    """The coordinator's deployment when ``WARDROUND_COORDINATOR_STATE`` names a folder.

    None outside a coordinator (a simulation, ``flwr run`` on a laptop).
    """
    value = (os.environ if environ is None else environ).get(STATE_ENV, "")
    if not value:
        return None
    state_dir = Path(value)
    if not state_dir.is_dir():
        log.warning("%s=%s is not a folder: not in deployment mode", STATE_ENV, value)
        return None
    return Deployment.open(state_dir)
