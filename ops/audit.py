"""The audit log: an append-only, keyed hash-chained JSONL file of operational facts.

The coordinator and each site daemon keep one (``audit.jsonl``). Every line holds a
sequence number, a UTC time, the actor that wrote it, an :class:`AuditEvent`, a few
fields, the seal of the line before it (``prev``) and its own seal, ``hmac``: an
HMAC-SHA256 over its canonical JSON under the log owner's key. The key lives beside
the log (``audit.key``, mode 0600, made on the first record). The chain makes an
edited, deleted, inserted or reordered line detectable by :func:`verify_audit`, and,
because the seal is keyed, so is a log rewritten and re-chained by someone who can
write the file but not read the key. Only a truncation of the newest lines is not.

Logs written before the chain was keyed seal their lines with a plain ``sha256``.
They are still read and verified; such lines are reported as unkeyed, and a log
with no keyed line does not verify as ok. Once a log has keyed lines, an unkeyed
line after them is a break.

The log must never hold patient data: :meth:`AuditLog.record` takes only the
fields :func:`~wardround.ops.audit_fields.check_fields` allows.

Several processes may append to one file (the coordinator daemon and a
``wardround launch`` follower): the file is a :mod:`wardround.ops.jsonl_log`, whose
appends hold an exclusive ``flock`` and read the previous line from the end of the
file under it. A crash mid-append leaves a torn last line; readers ignore it, and
the next append cuts it off first.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, DataError
from .audit_fields import (
    RESERVED_KEYS,
    SAFE_TEXT,
    AuditEvent,
    check_fields,
    safe_reason,
)
from .audit_query import as_utc, event_names, event_time, filter_events, merge_by_time
from .jsonl_log import (
    GENESIS,
    AppendHandle,
    chain_prev,
    chain_problem,
    hmac_seal,
    locked_for_append,
    parse_object,
    read_locked,
    seal_of,
    sha256_seal,
)
from .secret_file import load_or_create_secret, read_secret

__all__ = [
    "AUDIT_FILENAME",
    "GENESIS",
    "RESERVED_KEYS",
    "AuditCheck",
    "AuditEvent",
    "AuditLog",
    "as_utc",
    "audit_key_path",
    "check_fields",
    "event_names",
    "event_time",
    "filter_events",
    "merge_by_time",
    "read_audit",
    "safe_reason",
    "verify_audit",
]

AUDIT_FILENAME = "audit.jsonl"
AUDIT_KEY_SUFFIX = ".key"  # audit.jsonl -> audit.key, beside it

_REPAIR_HINT = (
    "Run `wardround audit --verify` on it to see where; keep the damaged file for "
    "investigation and start a new log beside it."
)


@dataclass(frozen=True)
class AuditCheck:
    """The verdict of :func:`verify_audit` on one file.

    Attributes
    ----------
    ok
        Every complete line verifies and the chain is unbroken.
    lines
        Complete (newline-terminated or verifying) lines in the file.
    first_bad_line
        1-based number of the first line that breaks the chain, or None.
    problem
        What is wrong with that line (or with the log, when no line is keyed), or
        None.
    torn_tail
        The file ends in a partial line (a crash mid-append); it is ignored and is
        not a chain break.
    unkeyed_lines
        Leading lines sealed by a plain sha256 (written before logs were keyed).
        They are covered by the first keyed line after them; a log of unkeyed
        lines only is not ok.
    """

    ok: bool
    lines: int
    first_bad_line: int | None = None
    problem: str | None = None
    torn_tail: bool = False
    unkeyed_lines: int = 0


def audit_key_path(log_path: Path) -> Path:
    """Where a log's key lives by default: beside it, ``audit.jsonl`` -> ``audit.key``."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.stem + AUDIT_KEY_SUFFIX)


# -- encoding --------------------------------------------------------------------
def _seal_problem(entry: Mapping[str, Any], key: bytes | None) -> str | None:
    """Whether a line's seal matches its content (keyed lines need ``key``)."""
    if "hmac" in entry:
        body = {k: v for k, v in entry.items() if k != "hmac"}
        if key is None:
            return "it is keyed, and no key was given"
        if not isinstance(entry["hmac"], str) or not hmac.compare_digest(
            entry["hmac"], hmac_seal(key, body)
        ):
            return (
                "its hmac does not match its content under the log's key (edited, "
                "or re-sealed without the key)"
            )
        return None
    body = {k: v for k, v in entry.items() if k != "sha256"}
    if entry.get("sha256") != sha256_seal(body):
        return "its sha256 does not match its content (edited or corrupted)"
    return None


def _encode(entry: Mapping[str, Any]) -> bytes:
    # Written in field order (seq, time, actor, event, ..., prev, sha256) so the file
    # reads naturally; the hash is over the sorted form, so order does not matter.
    return (json.dumps(entry, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _utc_now() -> str:
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _parse(line: bytes) -> dict[str, Any] | None:
    """The JSON object on one line, or None when it is not one."""
    return parse_object(line)[0]


def _line_problem(
    entry: dict[str, Any], seq: int, prev: str, key: bytes | None, keyed_before: bool
) -> str | None:
    """What is wrong with a parsed line expected at ``seq`` after ``prev``, or None."""
    if keyed_before and "hmac" not in entry:
        return (
            "it is not keyed, though lines before it are (rewritten by someone "
            "without the key)"
        )
    if (problem := _seal_problem(entry, key)) is not None:
        return problem
    for name, kind in (("time", str), ("actor", str), ("event", str), ("prev", str)):
        if not isinstance(entry.get(name), kind):
            return f"field {name!r} is missing or has the wrong type"
    got = entry.get("seq")
    if isinstance(got, bool) or not isinstance(got, int) or got != seq:
        return (
            f"seq is {got!r} where {seq} was expected (a line was deleted, inserted "
            "or moved)"
        )
    return chain_problem(entry, prev)


# -- writing ---------------------------------------------------------------------
class AuditLog:
    """Appends audit lines to one file; safe across threads and processes.

    Parameters
    ----------
    path
        The log file (``audit.jsonl``); it and its folders are created on the first
        record, the file with mode 0600.
    actor
        Who writes: e.g. ``coordinator`` or ``site:st-marys``.
    key_path
        The log owner's HMAC key (default :func:`audit_key_path`: ``audit.key``
        beside the log), created with mode 0600 on the first record.
    """

    def __init__(self, path: Path, actor: str, key_path: Path | None = None) -> None:
        if not isinstance(actor, str) or not actor or not SAFE_TEXT.fullmatch(actor):
            raise ValueError(
                "audit actor must be a short string over the audit alphabet"
            )
        self.path = Path(path)
        self.actor = actor
        self.key_path = Path(key_path) if key_path else audit_key_path(self.path)
        self._key: bytes | None = None

    def record(self, event: AuditEvent | str, **fields: Any) -> dict[str, Any]:
        """Durably append one event; the line written, as a dict.

        Raises
        ------
        ValueError
            ``event`` is not an :class:`AuditEvent`, or a field may not be logged
            (see :func:`check_fields`); nothing is written.
        DataError
            The file's last complete line does not verify: appending would extend
            a chain that is already broken.
        """
        kind = AuditEvent(event)
        checked = check_fields(fields)
        key_existed = self.key_path.exists()
        if self._key is None:
            self._key = load_or_create_secret(self.key_path, "the audit key")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with locked_for_append(self.path, create=True) as log_file:
            last, torn_at, glue = self._last_line(log_file)
            if last is not None and "hmac" not in last and key_existed:
                # A keyed log ends in an unkeyed line: someone without the key
                # rewrote it. Appending a keyed line would seal their version.
                raise DataError(
                    f"audit log {self.path} is damaged: its last line is not keyed, "
                    f"though its key {self.key_path} exists",
                    hint=_REPAIR_HINT,
                )
            body: dict[str, Any] = {
                "seq": 0 if last is None else last["seq"] + 1,
                # taken under the lock, so time follows seq across writers
                "time": _utc_now(),
                "actor": self.actor,
                "event": kind.value,
                **checked,
                "prev": chain_prev(last),
            }
            entry = {**body, "hmac": hmac_seal(self._key, body)}
            log_file.append(_encode(entry), cut_at=torn_at, after_partial=glue)
        return entry

    def _last_line(
        self, log_file: AppendHandle
    ) -> tuple[dict[str, Any] | None, int | None, bool]:
        """(last complete line, offset of a torn tail, whether a newline must precede)."""
        buf, whole, size = log_file.read_tail()
        head, _, tail = buf.rpartition(b"\n")
        if tail:
            entry = _parse(tail)
            if entry is not None:  # complete but for its newline: keep it
                return self._checked_last(entry), None, True
            torn_at = size - len(tail)
        else:
            torn_at = None
        if not head and whole and not buf.startswith(b"\n"):
            return None, torn_at, False  # nothing but (maybe) a torn tail
        last = _parse(head.rpartition(b"\n")[2])
        if last is None:
            raise DataError(
                f"audit log {self.path} is damaged: its last line is not JSON",
                hint=_REPAIR_HINT,
            )
        return self._checked_last(last), torn_at, False

    def _checked_last(self, entry: dict[str, Any]) -> dict[str, Any]:
        seq = entry.get("seq")
        if (
            _seal_problem(entry, self._key) is not None
            or isinstance(seq, bool)
            or not isinstance(seq, int)
        ):
            raise DataError(
                f"audit log {self.path} is damaged: its last line does not verify",
                hint=_REPAIR_HINT,
            )
        return entry


# -- reading ---------------------------------------------------------------------
def _scan(
    raw: bytes, key: bytes | None = None
) -> tuple[list[dict[str, Any] | None], AuditCheck]:
    """Every complete line parsed (None where not JSON) and the chain's verdict."""
    *complete, tail = raw.split(b"\n")
    parsed: list[dict[str, Any] | None] = [_parse(line) for line in complete]
    torn = False
    if tail:
        entry = _parse(tail)
        if entry is None:
            torn = True  # a prefix of a JSON object never parses: a torn append
        else:
            parsed.append(entry)
    first_bad = problem = None
    prev = GENESIS
    unkeyed = 0
    for number, entry in enumerate(parsed, start=1):
        problem = (
            "not a JSON object"
            if entry is None
            else _line_problem(entry, number - 1, prev, key, unkeyed < number - 1)
        )
        if entry is None or problem is not None:
            first_bad = number
            break
        unkeyed += "hmac" not in entry
        prev = seal_of(entry)
    if first_bad is None and parsed and unkeyed == len(parsed):
        problem = (
            "no line is keyed: its sha256 chain holds, but anyone who can write the "
            "file could have rewritten it"
        )
    check = AuditCheck(
        ok=problem is None,
        lines=len(parsed),
        first_bad_line=first_bad,
        problem=problem,
        torn_tail=torn,
        unkeyed_lines=unkeyed,
    )
    return parsed, check


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every event in ``path`` in file order; a torn last line is ignored.

    The entries are returned as written, hash or not: use :func:`verify_audit` to
    know whether to trust them.

    Raises
    ------
    FileNotFoundError
        There is no file at ``path``.
    DataError
        A complete line is not a JSON object.
    """
    path = Path(path)
    parsed, _ = _scan(read_locked(path))
    for number, entry in enumerate(parsed, start=1):
        if entry is None:
            raise DataError(
                f"audit log {path} is damaged at line {number}: not a JSON object",
                hint=_REPAIR_HINT,
            )
    return [entry for entry in parsed if entry is not None]


def verify_audit(path: Path, key_path: Path | None = None) -> AuditCheck:
    """Check the keyed chain of ``path`` (FileNotFoundError if it is missing).

    The key is read from ``key_path``, by default ``audit.key`` beside the log.

    Raises
    ------
    ConfigError
        The log has keyed lines and there is no key to check them with, or the key
        file is readable by other users.
    """
    path = Path(path)
    key_file = Path(key_path) if key_path else audit_key_path(path)
    key = read_secret(key_file, "the audit key") if key_file.exists() else None
    raw = read_locked(path)
    parsed, check = _scan(raw, key)
    if key is None and check.first_bad_line is not None:
        entry = parsed[check.first_bad_line - 1]
        if entry is not None and "hmac" in entry:
            raise ConfigError(
                f"audit log {path} is keyed, and its key is not at {key_file}",
                hint="Give the key with `wardround audit --verify --key FILE`.",
            )
    return check
