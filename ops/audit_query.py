"""Filtering and merging audit events (pure: no file is read here)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .audit_fields import AuditEvent

RUN_FIELDS = ("run_id", "flower_run", "flower_run_id")
"""Fields naming one run: the coordinator's run name (``run_id`` in its lines), or
Flower's numeric run id (``run_id`` in a site daemon's lines, ``flower_run`` in a
site's answers, ``flower_run_id`` in the coordinator's launch and resume lines)."""
APP_FIELDS = ("fab_hash", "ledger_run")
"""Fields naming what a run runs, not one run: the app hash, and the key of the
site's privacy ledger (one per approved app, whichever Flower runs it became)."""
MIN_APP_PREFIX = 8
"""Hex digits an app hash prefix needs: a run name ends in the first eight."""

_RUN_NAME = re.compile(r"\d{8}-\d{6}-(?P<app>[0-9a-f]{8})")
_HEX = re.compile(rf"[0-9a-f]{{{MIN_APP_PREFIX},}}")


def event_time(entry: Mapping[str, Any]) -> datetime | None:
    """The aware UTC time of an audit entry, or None when it has no readable time."""
    stamp = entry.get("time")
    if not isinstance(stamp, str):
        return None
    try:
        return as_utc(datetime.fromisoformat(stamp))
    except ValueError:
        return None


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime; a naive one is taken to be UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def event_names(event: AuditEvent | str | Iterable[AuditEvent | str]) -> set[str]:
    """The event values named by one event or several (ValueError on an unknown one)."""
    several = [event] if isinstance(event, str) else list(event)
    return {AuditEvent(name).value for name in several}


def filter_events(
    events: Iterable[Mapping[str, Any]],
    *,
    run: str | None = None,
    site: str | None = None,
    event: AuditEvent | str | Iterable[AuditEvent | str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """The events matching every given criterion, in their order.

    Parameters
    ----------
    run
        Any identifier of one run (see :func:`run_identifiers`): its run name,
        one of its Flower run ids, its app hash (at least 8 hex digits) or a
        site's ledger key. Selects the run's lines in the coordinator's and the
        sites' logs alike, so pass every log's events together.
    site
        Matches the field ``site``, membership in the list field ``sites``, or
        the site's own lines (``actor`` ``site:NAME``).
    event
        One event or several (ValueError on an unknown name).
    since, until
        Inclusive bounds on the event time; naive datetimes are taken as UTC. An
        event without a readable time is left out when either is given.
    """
    wanted = None if event is None else event_names(event)
    lower = None if since is None else as_utc(since)
    upper = None if until is None else as_utc(until)
    events = list(events)
    of_run = None if run is None else run_identifiers(events, run)
    kept = []
    for entry in events:
        if of_run is not None and not of_run.selects(entry):
            continue
        if site is not None and not _has_site(entry, site):
            continue
        if wanted is not None and entry.get("event") not in wanted:
            continue
        if lower is not None or upper is not None:
            moment = event_time(entry)
            if moment is None:
                continue
            if (lower is not None and moment < lower) or (
                upper is not None and moment > upper
            ):
                continue
        kept.append(dict(entry))
    return kept


@dataclass
class RunIdentifiers:
    """What one run is called in the logs; :meth:`selects` tells its lines.

    Attributes
    ----------
    runs
        Run names and Flower run ids (strings): a line naming any is the run's.
    apps
        App hashes, their prefixes and site ledger keys: a line naming no run but
        one of these (an approval, say) is the run's too.
    """

    runs: set[str] = field(default_factory=set)
    apps: set[str] = field(default_factory=set)
    unclaimed: set[str] = field(default_factory=set)
    """Flower runs of this run's app that no coordinator line ties to a run name
    (run outside ``launch``, or before its line was written): taken in, since
    the site's ledger charges them to the same approved run; the command says so."""

    def selects(self, entry: Mapping[str, Any]) -> bool:
        """Whether ``entry`` is one of this run's lines."""
        runs = _runs_named(entry)
        if runs:
            return not runs.isdisjoint(self.runs)
        return any(
            _same_app(mine, app) for mine in self.apps for app in _apps_named(entry)
        )


def run_identifiers(events: Iterable[Mapping[str, Any]], run: str) -> RunIdentifiers:
    """Every identifier of the run that ``run`` names, from lines naming two together.

    A run name and its Flower run ids are tied by the coordinator's launch and
    resume lines. When no Flower run id is known that way (no coordinator log
    given, or ``run`` names an app or a ledger key), the app ties them: a run
    name ends in its app hash prefix, and a site's ``run_started`` names the
    Flower run and the app. That tie also takes in other runs of the same app,
    as the site's ledger does.
    """
    events = list(events)
    wanted = run.strip()
    found = RunIdentifiers(runs={wanted})
    if _HEX.fullmatch(wanted.lower()) and not wanted.isdigit():  # not a Flower id
        found.apps.add(wanted.lower())
    _add_linked_runs(events, found)
    flower_runs = {name for name in found.runs if name.isdigit()}
    if not any(_runs_named(entry) & flower_runs for entry in events):
        found.apps |= {app for name in found.runs for app in _app_of_name(name)}
        for entry in events:
            if any(
                _same_app(mine, app)
                for mine in found.apps
                for app in _apps_named(entry)
            ):
                found.runs |= _runs_named(entry)
        _add_linked_runs(events, found)
    for entry in events:
        if not _runs_named(entry).isdisjoint(found.runs):
            found.apps |= _apps_named(entry)
    claimed = {run for entry in events if len(r := _runs_named(entry)) > 1 for run in r}
    for entry in events:
        runs = _runs_named(entry)
        if (
            claimed  # only a coordinator's log tells claimed runs from others
            and runs
            and runs.isdisjoint(found.runs)
            and runs.isdisjoint(claimed)
            and all(name.isdigit() for name in runs)
            and any(_same_app(m, a) for m in found.apps for a in _apps_named(entry))
        ):
            found.unclaimed |= runs
    found.runs |= found.unclaimed
    return found


def _add_linked_runs(events: list[Mapping[str, Any]], found: RunIdentifiers) -> None:
    """Add the run names and Flower ids named beside one already found, until none is new."""
    while True:
        before = len(found.runs)
        for entry in events:
            runs = _runs_named(entry)
            if len(runs) > 1 and not runs.isdisjoint(found.runs):
                found.runs |= runs
        if len(found.runs) == before:
            return


def _runs_named(entry: Mapping[str, Any]) -> set[str]:
    return {
        str(value)
        for key in RUN_FIELDS
        if isinstance(value := entry.get(key), str | int)
        and not isinstance(value, bool)
    }


def _apps_named(entry: Mapping[str, Any]) -> set[str]:
    apps = {
        value.lower() for key in APP_FIELDS if isinstance(value := entry.get(key), str)
    }
    run_id = entry.get("run_id")
    return apps | (_app_of_name(run_id) if isinstance(run_id, str) else set())


def _app_of_name(name: str) -> set[str]:
    """The app hash prefix a run name ends in (``20261207-040131-4f37e74c``), if any."""
    matched = _RUN_NAME.fullmatch(name)
    return {matched["app"]} if matched else set()


def _same_app(one: str, other: str) -> bool:
    """Whether two app hashes agree on their common prefix of at least 8 hex digits."""
    common = min(len(one), len(other))
    return common >= MIN_APP_PREFIX and one[:common] == other[:common]


def _has_site(entry: Mapping[str, Any], site: str) -> bool:
    sites = entry.get("sites")
    return (
        entry.get("site") == site
        or (isinstance(sites, list) and site in sites)
        or entry.get("actor") == f"site:{site}"  # the site's own log's lines
    )


def merge_by_time(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Events from several logs interleaved by time (stable; unreadable times first)."""
    earliest = datetime.min.replace(tzinfo=UTC)
    return sorted(
        (dict(entry) for entry in events),
        key=lambda entry: event_time(entry) or earliest,
    )
