"""What the site's ``/metrics`` counts over its egress and audit logs, line by line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REFUSAL_EVENTS = ("app_refused", "answer_refused")


@dataclass
class TaskTotals:
    """Tasks by message type and outcome, their wall time, and the bytes in and out."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    durations: dict[str, tuple[int, float]] = field(default_factory=dict)
    bytes_out: int = 0
    bytes_in: int = 0


def _number(value: Any, kind: type[int] | type[float]) -> int | float:
    """A log field as a number; 0 for a missing or mangled one (a torn, rejoined line)."""
    try:
        return kind(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def fold_task(totals: TaskTotals, row: dict[str, Any]) -> None:
    """Add one egress-log line to ``totals``."""
    kind = str(row.get("message_type", ""))
    key = (kind, "true" if row.get("ok") else "false")
    totals.counts[key] = totals.counts.get(key, 0) + 1
    count, seconds = totals.durations.get(kind, (0, 0.0))
    totals.durations[kind] = (count + 1, seconds + _number(row.get("seconds"), float))
    totals.bytes_out += int(_number(row.get("bytes_out"), int))
    totals.bytes_in += int(_number(row.get("bytes_in"), int))


def no_refusals() -> dict[str, int]:
    """Every refusal event at zero, so each is exported before the first one."""
    return dict.fromkeys(REFUSAL_EVENTS, 0)


def fold_refusal(refused: dict[str, int], row: dict[str, Any]) -> None:
    """Count one audit-log line if it records a refusal."""
    event = row.get("event")
    if event in refused:
        refused[event] += 1
