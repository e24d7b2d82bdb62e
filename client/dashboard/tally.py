"""Running totals over an append-only JSON Lines log, read once line by line.

The site's ``/metrics`` counts tasks, bytes and refusals over the whole egress and
audit logs, which grow with every task for as long as the site runs (a year of
tasks is tens of MB). Reading them whole at every scrape costs the site's CPU in
proportion to its age; a tally keeps its place in the file and folds in only the
lines appended since the last scrape.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

Total = TypeVar("Total")

_FINGERPRINT_BYTES = 256
"""How much of what was read is kept to notice the file rewritten under it."""


class JsonlTally(Generic[Total]):
    """``fold`` applied to every complete JSON-object line of ``path``, kept up to date.

    A line without its newline (a torn or half-written append) waits for the next
    read; a line that is not a JSON object is skipped, as the logs' readers do. A
    file replaced (another inode), cut shorter than what was read, or rewritten in
    place (the bytes before the place read no longer those seen: a restored
    backup, a copy-truncate rotation) starts the tally again from its first line.
    """

    def __init__(
        self,
        path: Path,
        empty: Callable[[], Total],
        fold: Callable[[Total, dict[str, Any]], None],
    ) -> None:
        self.path = Path(path)
        self._empty = empty
        self._fold = fold
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None
        self._offset = 0
        self._seen_last = b""  # the bytes just before the offset, as read
        self._total = empty()

    def total(self) -> Total:
        """A copy of the total over the file's complete lines as it stands now."""
        with self._lock:
            self._catch_up()
            return copy.deepcopy(self._total)

    def _restart(self, identity: tuple[int, int] | None) -> None:
        self._identity = identity
        self._offset = 0
        self._seen_last = b""
        self._total = self._empty()

    def _catch_up(self) -> None:
        try:
            handle = self.path.open("rb")
        except OSError:
            self._restart(None)
            return
        with handle:
            info = os.fstat(handle.fileno())
            identity = (info.st_dev, info.st_ino)
            if identity != self._identity or info.st_size < self._offset:
                self._restart(identity)
            elif self._seen_last:
                handle.seek(self._offset - len(self._seen_last))
                if handle.read(len(self._seen_last)) != self._seen_last:
                    self._restart(identity)
            handle.seek(self._offset)
            appended = handle.read(info.st_size - self._offset)
        complete = appended[: appended.rfind(b"\n") + 1]
        if complete:
            self._seen_last = (self._seen_last + complete)[-_FINGERPRINT_BYTES:]
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                self._fold(self._total, row)
        self._offset += len(complete)
