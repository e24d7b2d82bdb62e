"""pydicom's warnings about malformed files: counted by kind, kept in the log.

pydicom reports a malformed value twice, with ``warnings.warn`` and as a WARNING of
its ``pydicom`` logger (``pydicom.misc.warn_and_log``). On a real archive that is
dozens of lines above a `site check` or `site deid` report. :func:`capture` takes
both channels while a file is read and gives back each warning's *kind*: pydicom's
message with quoted values, numbers and links masked, so header values never
reach a report or a log. Callers count kinds in their reports and log each
(file, kind) at INFO on :data:`LOGGER`, which the CLI sends to a file
(:func:`log_to_file`), not the terminal. Other libraries' warnings pass through unchanged.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: the logger that holds every (file, kind); ``site check`` writes it to a file
LOGGER = "wardround.pydicom_warnings"

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_LINK = re.compile(r"\s*Please see <[^>]*>[^.]*\.?|<[a-z]+://[^>]*>")
_NUMBER = re.compile(r"\b(0x[0-9a-fA-F]+|\d+(\.\d+)*)\b")
_MAX_KIND = 160


def warning_kind(message: str) -> str:
    """The kind of a pydicom message: quoted values, numbers and links masked."""
    kind = _LINK.sub("", str(message))
    kind = _NUMBER.sub("N", _QUOTED.sub("'…'", kind))
    kind = " ".join(kind.split())
    return kind[:_MAX_KIND] or "(empty warning)"


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


@contextmanager
def capture() -> Iterator[list[str]]:
    """Take pydicom's warnings while the block runs; the list fills with their kinds.

    A message that pydicom both logged and warned counts once. Not thread-safe
    (``warnings.catch_warnings``): use it where one thread reads files.
    """
    kinds: list[str] = []
    handler = _Messages()
    pydicom_log = logging.getLogger("pydicom")
    propagate = pydicom_log.propagate
    pydicom_log.addHandler(handler)
    pydicom_log.propagate = False
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield kinds
    finally:
        pydicom_log.removeHandler(handler)
        pydicom_log.propagate = propagate
        logged = Counter(handler.messages)
        warned: Counter[str] = Counter()
        for w in caught:
            message = str(w.message)
            # A ResourceWarning is the garbage collector's about some other object
            # (an unclosed socket), raised in whatever code runs at that moment.
            ours = not issubclass(w.category, ResourceWarning) and (
                message in logged or "pydicom" in w.filename.replace("\\", "/")
            )
            if ours:
                warned[message] += 1
            else:  # not pydicom's: let it through as if never caught
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for message, n in (logged | warned).items():
            kinds.extend([warning_kind(message)] * n)


def count_kinds(per_file: Iterable[Iterable[str] | None]) -> dict[str, int]:
    """Kind -> how many times, most frequent first."""
    counts: Counter[str] = Counter()
    for kinds in per_file:
        counts.update(kinds or ())
    return dict(counts.most_common())


def log_kinds(what: str, kinds: Iterable[str]) -> None:
    """Log each kind that ``what`` (a file, a study) raised, at INFO on LOGGER."""
    log = logging.getLogger(LOGGER)
    for kind in kinds:
        log.info("%s: pydicom: %s", what, kind)


@contextmanager
def log_to_file(path: Path | None) -> Iterator[None]:
    """For an entry point: send LOGGER (file and kind) to ``path``, not the terminal.

    ``path`` is rewritten (the last check's warnings); None: leave LOGGER as it is.
    """
    if path is None:
        yield
        return
    log = logging.getLogger(LOGGER)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    saved = (log.level, log.propagate)
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(saved[0])
        log.propagate = saved[1]
