"""What an audit line may hold: numbers, booleans, nulls and short safe strings.

The audit log must never hold patient data, so :meth:`AuditLog.record
<wardround.ops.audit.AuditLog.record>` refuses anything but numbers, booleans,
nulls and short strings over a conservative alphabet (identifiers, run ids, site
names, hashes, host:port, file paths, controlled reasons), in flat lists or
one-level dicts. A refusal names the field, never its value: the value may be the
very thing that must not be written anywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import PurePath
from typing import Any

MAX_TEXT = 300
MAX_ITEMS = 1024  # per list or dict field: more than any federation has sites
RESERVED_KEYS = frozenset({"seq", "time", "actor", "event", "prev", "sha256", "hmac"})

_ALPHABET = r"A-Za-z0-9 ._:/@=+,()\[\]'\-"
SAFE_TEXT = re.compile(rf"[{_ALPHABET}]{{0,{MAX_TEXT}}}")
_UNSAFE_CHAR = re.compile(rf"[^{_ALPHABET}]")
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

Scalar = int | float | bool | str | None


class AuditEvent(StrEnum):
    """What happened; the only events an audit line may record."""

    COORDINATOR_STARTED = "coordinator_started"
    COORDINATOR_STOPPED = "coordinator_stopped"
    SITE_DAEMON_STARTED = "site_daemon_started"
    SITE_DAEMON_STOPPED = "site_daemon_stopped"
    SUPERNODE_RESTARTED = "supernode_restarted"
    RUNTIME_PORT_MOVED = "runtime_port_moved"
    SITE_ENROLLED = "site_enrolled"
    SITE_REVOKED = "site_revoked"
    SITE_JOINED = "site_joined"
    SITE_LEFT = "site_left"
    SITE_REFUSED = "site_refused"
    NODE_IGNORED = "node_ignored"
    RUN_STARTED = "run_started"
    RUN_RESUMED = "run_resumed"
    RUN_PAUSED = "run_paused"
    RUN_FINISHED = "run_finished"
    RUN_STOPPED = "run_stopped"
    ROUND_STARTED = "round_started"
    ROUND_FINISHED = "round_finished"
    ROUND_REPEATED = "round_repeated"
    APP_APPROVED = "app_approved"
    APP_REFUSED = "app_refused"
    PRIVACY_SPENT = "privacy_spent"
    ANSWER_SENT = "answer_sent"
    ANSWER_REFUSED = "answer_refused"
    ANSWER_REPLAYED = "answer_replayed"
    ERROR = "error"


def coordinator_label(text: object, limit: int = 80) -> str:
    """A name the coordinator chose (a run's), as the site may keep and show it.

    Printable characters only, at most ``limit``: it goes into every egress line
    and terminal line of its run, and a coordinator could make it megabytes long.
    """
    return "".join(c for c in str(text) if c.isprintable())[:limit]


def safe_reason(text: object) -> str:
    """``text`` squeezed into the audit alphabet, for logging an error reason.

    Other characters become spaces, runs of spaces collapse, and the result is cut
    to 300 characters. This only makes the text *loggable*; it does not make it
    free of patient data. Pass it controlled text, e.g.
    :func:`wardround.common.errors.safe_error_reason`, never ``str(exc)`` of an
    exception raised by code that reads patient data.
    """
    squeezed = " ".join(_UNSAFE_CHAR.sub(" ", str(text)).split())
    return squeezed[:MAX_TEXT].rstrip()


def check_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of one audit line as plain JSON values; ValueError if one may not be logged.

    Allowed values are int, finite float, bool, None and strings of at most 300
    characters from letters, digits, space and ``._:/@=+,-()[]'`` (paths are taken
    as strings); a list of those; or a dict from such strings to those. Field
    names are snake_case and not one of :data:`RESERVED_KEYS`. The error names
    the field and never contains its value.
    """
    checked: dict[str, Any] = {}
    for name, value in fields.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise ValueError(
                f"audit field name {str(name)[:64]!r} is not a snake_case identifier"
            )
        if name in RESERVED_KEYS:
            raise ValueError(
                f"audit field {name!r} is reserved: the log writes it itself"
            )
        checked[name] = _checked_value(name, value)
    return checked


def _checked_value(name: str, value: Any) -> Any:
    if isinstance(value, list | tuple):
        _check_size(name, value)
        return [
            _checked_scalar(name, item, f" item {i}") for i, item in enumerate(value)
        ]
    if isinstance(value, Mapping):
        _check_size(name, value)
        out: dict[str, Scalar] = {}
        for i, (key, item) in enumerate(value.items()):
            if not isinstance(key, str) or not key or not SAFE_TEXT.fullmatch(key):
                raise ValueError(
                    f"audit field {name!r} has a key (entry {i}) that is not a short "
                    "string over the audit alphabet"
                )
            out[key] = _checked_scalar(name, item, f" entry {i}")
        return out
    return _checked_scalar(name, value, "")


def _check_size(name: str, value: Sequence[Any] | Mapping[Any, Any]) -> None:
    if len(value) > MAX_ITEMS:
        raise ValueError(f"audit field {name!r} has more than {MAX_ITEMS} items")


def _checked_scalar(name: str, value: Any, where: str) -> Scalar:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit field {name!r}{where} is not a finite number")
        return float(value)
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str):
        if not SAFE_TEXT.fullmatch(value):
            raise ValueError(
                f"audit field {name!r}{where} is refused: text must be at most "
                f"{MAX_TEXT} characters of letters, digits, space and ._:/@=+,-()[]' "
                "(the audit log holds operational facts only; pass error messages "
                "through safe_reason())"
            )
        return str(value)
    if isinstance(value, list | tuple | Mapping):
        raise ValueError(f"audit field {name!r}{where} nests deeper than one level")
    raise ValueError(
        f"audit field {name!r}{where} has type {type(value).__name__}; only int, "
        "float, bool, None and str may be logged"
    )
