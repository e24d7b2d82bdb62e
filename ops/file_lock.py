"""An exclusive lock on a lock file, shared by processes that build the same thing.

The first process to ask builds (a public base, a sigma); the others wait on the
lock and then find the result. ``flock`` locks go with the open file, so the lock
is released when the holder exits, however it exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_POLL_S = 0.05
_IN_USE_PROBE_S = 1.0


def _flock_within(handle: Any, wait_s: float) -> None:
    """Take ``handle``'s exclusive lock, retrying for ``wait_s``; else BlockingIOError."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_POLL_S)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created, with its folder).

    ``wait_s`` None waits as long as the holder takes; otherwise TimeoutError once
    the lock has stayed taken for ``wait_s`` seconds.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        if wait_s is None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:
            try:
                _flock_within(handle, wait_s)
            except BlockingIOError:
                raise TimeoutError(
                    f"{lock_path} stayed locked for {wait_s:g} s"
                ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def sole_user(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock while this process uses it; refuse if another does.

    For state a second daemon would corrupt (a coordinator's enrolment, a site's
    SuperNode state). The holder's pid is written into the lock file, so the
    refusal can name it.

    Raises
    ------
    ConfigError
        Another process holds the lock.
    """
    from ..common.errors import ConfigError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / "in-use.lock"
    with lock_path.open("a+") as handle:
        try:
            # a moment's wait: `in_use` (launch asking whether the coordinator
            # runs) holds a shared lock for an instant
            _flock_within(handle, _IN_USE_PROBE_S)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConfigError(
                f"{folder} is in use by another {what} (pid {holder})",
                hint=f"Stop that {what} first. Another state folder is for "
                "another daemon with its own key (the same site in another "
                "federation, say): one key runs one daemon.",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def in_use(folder: Path) -> bool:
    """Whether a process holds ``folder``'s :func:`sole_user` lock now."""
    lock_path = Path(folder) / "in-use.lock"
    try:
        handle = lock_path.open("r")
    except FileNotFoundError:
        return False
    except OSError:  # not ours to read: say nothing we cannot tell
        return True
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
