"""An append-only, sealed JSONL file: the one primitive under the audit log and the ledger.

Each line is one JSON object sealed by a hash of its canonical form (sorted keys,
no spaces, no NaN): a plain ``sha256``, or an ``hmac`` under the owner's key. In a
hash chain each line also repeats the seal of the line before it (``prev``; the
first repeats :data:`GENESIS`), so a deleted, inserted or reordered line breaks the
chain (:func:`chain_prev`, :func:`chain_problem`). The audit log
(:mod:`wardround.ops.audit`) and the privacy ledger (:mod:`wardround.client.ledger`,
from its version 2) are such chains.

Several processes may append to one file, so :func:`locked_for_append` holds an
exclusive ``flock`` while the writer reads what it needs and appends; the line is
fsync'ed, and a new file (mode 0600 whatever the umask) has its directory entry
fsync'ed too. A crash mid-append leaves a torn last line: readers ignore it and
the next append cuts it off first (:meth:`AppendHandle.append`).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

GENESIS = "0" * 64  # the ``prev`` of a chain's first line
PRIVATE_MODE = 0o600
_READ_CHUNK = 1 << 16
_TAIL_CHUNK = 4096


# -- sealing ---------------------------------------------------------------------
def canonical_json(body: Mapping[str, Any]) -> bytes:
    """The bytes a seal covers: sorted keys, no spaces, no NaN or infinity."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode()


def sha256_seal(body: Mapping[str, Any]) -> str:
    """The unkeyed seal of a line: sha256 of its canonical JSON, hex."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


def hmac_seal(key: bytes, body: Mapping[str, Any]) -> str:
    """The keyed seal of a line: HMAC-SHA256 of its canonical JSON under ``key``, hex."""
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def seal_of(entry: Mapping[str, Any]) -> Any:
    """A chained line's own seal, which the next line's ``prev`` repeats."""
    return entry["hmac"] if "hmac" in entry else entry.get("sha256")


def chain_prev(last: Mapping[str, Any] | None) -> str:
    """The ``prev`` of the line appended after ``last`` (None: the first line)."""
    return GENESIS if last is None else str(seal_of(last))


def chain_problem(entry: Mapping[str, Any], prev: str) -> str | None:
    """Why ``entry`` breaks the chain after a line sealed ``prev``, or None."""
    if not isinstance(entry.get("prev"), str):
        return "field 'prev' is missing or has the wrong type"
    if entry["prev"] != prev:
        return (
            "prev does not match the seal of the line before it (a line was "
            "deleted, inserted, moved or edited)"
        )
    return None


def parse_object(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object on one line, None) or (None, what is wrong with the line)."""
    try:
        entry = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        return None, "not valid JSON"
    if not isinstance(entry, dict):
        return None, "not a JSON object"
    return entry, None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid in a sealed JSONL line")


# -- reading ---------------------------------------------------------------------
def read_locked(path: Path) -> bytes:
    """The whole file under a shared lock: never a half-written line from a writer.

    FileNotFoundError when there is no file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return _read_from_start(fd)
    finally:
        os.close(fd)


def _read_from_start(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, _READ_CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


# -- appending -------------------------------------------------------------------
class AppendHandle:
    """A log file opened for append under an exclusive lock (see :func:`locked_for_append`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read_all(self) -> bytes:
        """Every byte of the file."""
        return _read_from_start(self.fd)

    def read_tail(self) -> tuple[bytes, bool, int]:
        """(the end of the file, whether it is the whole file, the file's size).

        Reads backwards in chunks until the end holds two newlines (or the whole
        file), so the last complete line is whole however long the log grows.
        """
        size = os.fstat(self.fd).st_size
        pos, buf = size, b""
        while pos > 0 and buf.count(b"\n") < 2:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            buf = os.pread(self.fd, step, pos) + buf
        return buf, pos == 0, size

    def append(
        self, line: bytes, *, cut_at: int | None = None, after_partial: bool = False
    ) -> None:
        """Durably append ``line`` (which ends in a newline).

        ``cut_at`` truncates a torn tail first (O_APPEND writes go to the new end);
        ``after_partial`` completes a last line that verifies but lacks its newline.
        """
        if cut_at is not None:
            os.ftruncate(self.fd, cut_at)
        view = memoryview((b"\n" if after_partial else b"") + line)
        while view:
            view = view[os.write(self.fd, view) :]
        os.fsync(self.fd)


@contextmanager
def locked_for_append(path: Path, *, create: bool) -> Iterator[AppendHandle]:
    """Open ``path`` for append under an exclusive ``flock``.

    With ``create`` a missing file is made (mode 0600); without it a missing file
    raises FileNotFoundError. The lock is released on leaving; a file made here has
    its directory entry fsync'ed once the block completes.
    """
    fd, created = _open_for_append(Path(path), create)
    try:
        if created:
            os.fchmod(fd, PRIVATE_MODE)  # whatever the umask
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield AppendHandle(fd)
    finally:
        os.close(fd)  # releases the lock
    if created:  # make the new directory entry durable too
        _fsync_dir(Path(path).parent)


def _open_for_append(path: Path, create: bool) -> tuple[int, bool]:
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    if create:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_MODE), True
        except FileExistsError:
            pass
    return os.open(path, flags), False


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
