"""Filtering and merging audit events (pure: no file is read here)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from .audit_fields import AuditEvent


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
        Matches the field ``run_id``.
    site
        Matches the field ``site``, or membership in the list field ``sites``.
    event
        One event or several (ValueError on an unknown name).
    since, until
        Inclusive bounds on the event time; naive datetimes are taken as UTC. An
        event without a readable time is left out when either is given.
    """
    wanted = None if event is None else event_names(event)
    lower = None if since is None else as_utc(since)
    upper = None if until is None else as_utc(until)
    kept = []
    for entry in events:
        if run is not None and entry.get("run_id") != run:
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


def _has_site(entry: Mapping[str, Any], site: str) -> bool:
    sites = entry.get("sites")
    return entry.get("site") == site or (isinstance(sites, list) and site in sites)


def merge_by_time(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Events from several logs interleaved by time (stable; unreadable times first)."""
    earliest = datetime.min.replace(tzinfo=UTC)
    return sorted(
        (dict(entry) for entry in events),
        key=lambda entry: event_time(entry) or earliest,
    )
