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

The log must never hold patient data, so :meth:`AuditLog.record` refuses anything
but numbers, booleans, nulls and short strings over a conservative alphabet
(identifiers, run ids, site names, hashes, host:port, file paths, controlled
reasons), in flat lists or one-level dicts. A refusal names the field, never its
value: the value may be the very thing that must not be written anywhere.

Several processes may append to one file (the coordinator daemon and a
``wardround launch`` follower), so appends hold an exclusive ``flock`` and read the
previous line from the end of the file under it. A crash mid-append leaves a torn
last line; readers ignore it, and the next append cuts it off first.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePath
from typing import Any

from ..common.errors import ConfigError, DataError
from .secret_file import load_or_create_secret, read_secret

AUDIT_FILENAME = "audit.jsonl"
AUDIT_KEY_SUFFIX = ".key"  # audit.jsonl -> audit.key, beside it
GENESIS = "0" * 64  # the ``prev`` of the first line
MAX_TEXT = 300
MAX_ITEMS = 1024  # per list or dict field: more than any federation has sites
RESERVED_KEYS = frozenset({"seq", "time", "actor", "event", "prev", "sha256", "hmac"})

_ALPHABET = r"A-Za-z0-9 ._:/@=+,()\[\]'\-"
_SAFE_TEXT = re.compile(rf"[{_ALPHABET}]{{0,{MAX_TEXT}}}")
_UNSAFE_CHAR = re.compile(rf"[^{_ALPHABET}]")
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TAIL_CHUNK = 4096
_REPAIR_HINT = (
    "Run `wardround audit --verify` on it to see where; keep the damaged file for "
    "investigation and start a new log beside it."
)

Scalar = int | float | bool | str | None


class AuditEvent(StrEnum):
    """What happened; the only events an audit line may record."""

    COORDINATOR_STARTED = "coordinator_started"
    COORDINATOR_STOPPED = "coordinator_stopped"
    SITE_DAEMON_STARTED = "site_daemon_started"
    SITE_DAEMON_STOPPED = "site_daemon_stopped"
    SUPERNODE_RESTARTED = "supernode_restarted"
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
    APP_APPROVED = "app_approved"
    APP_REFUSED = "app_refused"
    PRIVACY_SPENT = "privacy_spent"
    ANSWER_SENT = "answer_sent"
    ANSWER_REFUSED = "answer_refused"
    ERROR = "error"


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


# -- the safe alphabet -----------------------------------------------------------
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
            if not isinstance(key, str) or not key or not _SAFE_TEXT.fullmatch(key):
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
        if not _SAFE_TEXT.fullmatch(value):
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


# -- encoding --------------------------------------------------------------------
def _canonical(body: Mapping[str, Any]) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode()


def _digest(body: Mapping[str, Any]) -> str:
    """The unkeyed seal of logs written before keying (read, never written)."""
    return hashlib.sha256(_canonical(body)).hexdigest()


def _mac(key: bytes, body: Mapping[str, Any]) -> str:
    return hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()


def _seal(entry: Mapping[str, Any]) -> Any:
    """A line's own seal, which the next line's ``prev`` repeats."""
    return entry["hmac"] if "hmac" in entry else entry.get("sha256")


def _seal_problem(entry: Mapping[str, Any], key: bytes | None) -> str | None:
    """Whether a line's seal matches its content (keyed lines need ``key``)."""
    if "hmac" in entry:
        body = {k: v for k, v in entry.items() if k != "hmac"}
        if key is None:
            return "it is keyed, and no key was given"
        if not isinstance(entry["hmac"], str) or not hmac.compare_digest(
            entry["hmac"], _mac(key, body)
        ):
            return (
                "its hmac does not match its content under the log's key (edited, "
                "or re-sealed without the key)"
            )
        return None
    body = {k: v for k, v in entry.items() if k != "sha256"}
    if entry.get("sha256") != _digest(body):
        return "its sha256 does not match its content (edited or corrupted)"
    return None


def _encode(entry: Mapping[str, Any]) -> bytes:
    # Written in field order (seq, time, actor, event, ..., prev, sha256) so the file
    # reads naturally; the hash is over the sorted form, so order does not matter.
    return (json.dumps(entry, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _utc_now() -> str:
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid in an audit line")


def _parse(line: bytes) -> dict[str, Any] | None:
    """The JSON object on one line, or None when it is not one."""
    try:
        entry = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


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
    for key, kind in (("time", str), ("actor", str), ("event", str), ("prev", str)):
        if not isinstance(entry.get(key), kind):
            return f"field {key!r} is missing or has the wrong type"
    got = entry.get("seq")
    if isinstance(got, bool) or not isinstance(got, int) or got != seq:
        return (
            f"seq is {got!r} where {seq} was expected (a line was deleted, inserted "
            "or moved)"
        )
    if entry["prev"] != prev:
        return (
            "prev does not match the seal of the line before it (a line was "
            "deleted, inserted, moved or edited)"
        )
    return None


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
        if not isinstance(actor, str) or not actor or not _SAFE_TEXT.fullmatch(actor):
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
        fd, created = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last, torn_at, glue = self._last_line(fd)
            if last is not None and "hmac" not in last and key_existed:
                # A keyed log ends in an unkeyed line: someone without the key
                # rewrote it. Appending a keyed line would seal their version.
                raise DataError(
                    f"audit log {self.path} is damaged: its last line is not keyed, "
                    f"though its key {self.key_path} exists",
                    hint=_REPAIR_HINT,
                )
            if torn_at is not None:
                os.ftruncate(fd, torn_at)  # O_APPEND writes go to the new end
            body: dict[str, Any] = {
                "seq": 0 if last is None else last["seq"] + 1,
                # taken under the lock, so time follows seq across writers
                "time": _utc_now(),
                "actor": self.actor,
                "event": kind.value,
                **checked,
                "prev": GENESIS if last is None else _seal(last),
            }
            entry = {**body, "hmac": _mac(self._key, body)}
            view = memoryview((b"\n" if glue else b"") + _encode(entry))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        if created:  # make the new directory entry durable too
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return entry

    def _open(self) -> tuple[int, bool]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return os.open(self.path, flags), False
        os.fchmod(fd, 0o600)  # whatever the umask
        return fd, True

    def _last_line(self, fd: int) -> tuple[dict[str, Any] | None, int | None, bool]:
        """(last complete line, offset of a torn tail, whether a newline must precede).

        Reads backwards from the end in chunks until the last complete line is
        whole, so appending stays cheap however long the log grows.
        """
        size = os.fstat(fd).st_size
        pos, buf = size, b""
        while pos > 0 and buf.count(b"\n") < 2:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            buf = os.pread(fd, step, pos) + buf
        head, _, tail = buf.rpartition(b"\n")
        if tail:
            entry = _parse(tail)
            if entry is not None:  # complete but for its newline: keep it
                return self._checked_last(entry), None, True
            torn_at = size - len(tail)
        else:
            torn_at = None
        if not head and pos == 0 and not buf.startswith(b"\n"):
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
def _read_locked(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # never a half-written line from a writer
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


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
        if problem is not None:
            first_bad = number
            break
        unkeyed += "hmac" not in entry
        prev = _seal(entry)
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
    parsed, _ = _scan(_read_locked(path))
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
    raw = _read_locked(path)
    parsed, check = _scan(raw, key)
    if key is None and check.first_bad_line is not None:
        entry = parsed[check.first_bad_line - 1]
        if entry is not None and "hmac" in entry:
            raise ConfigError(
                f"audit log {path} is keyed, and its key is not at {key_file}",
                hint="Give the key with `wardround audit --verify --key FILE`.",
            )
    return check


# -- filtering (pure) ------------------------------------------------------------
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
