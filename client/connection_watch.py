"""What the SuperNode's log says about its link to the coordinator, for the operator.

Flower's SuperNode retries an unreachable coordinator without end and writes each
try only to its own log. A site pointed at a wrong address, or started before the
coordinator, would sit silent on the operator's terminal. The daemon feeds the
log's new lines here and prints what comes back: that the site has connected,
that the coordinator has not answered for a while (at growing intervals), and
that it answers again.

Pure: it reads text and a clock value, and returns messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Flower 1.41's SuperNode log lines (flwr/supercore/retry/*_retry.py and
# flwr/supernode/start_client_internal.py), matched whole: other lines carry text
# the coordinator chooses (Flower logs each message's group id), which must not
# pass for a connection event.
_FAILED = re.compile(r"Connection attempt failed, retrying in \d+(\.\d+)? seconds")
_RECOVERED = re.compile(
    r"Connection successful after \d+(\.\d+)? seconds and \d+ tries\."
)
_REGISTERED = re.compile(r"SuperNode ID: -?\d+")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_LOG_LINE = re.compile(r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\b.*?:\s+(.*)")
"""Flower's console format: the level, an optional time, a colon, the message."""


def _message(line: str) -> str | None:
    """The message of one of Flower's log lines (None for any other line)."""
    found = _LOG_LINE.fullmatch(_COLOUR.sub("", line).rstrip())
    return found.group(1) if found else None


FIRST_WARNING_S = 15.0
LONGEST_WARNING_GAP_S = 600.0


@dataclass
class ConnectionWatch:
    """Follows the SuperNode's connection state through its log."""

    coordinator: str
    log_path: str
    first_warning_s: float = FIRST_WARNING_S
    connected_once: bool = False
    failing_since: float | None = None
    failures: int = 0
    next_warning_s: float = FIRST_WARNING_S
    warned: bool = False

    def __post_init__(self) -> None:
        self.next_warning_s = self.first_warning_s

    def feed(self, text: str, now: float) -> list[str]:
        """Messages for the operator, given the log's new text at time ``now``."""
        messages: list[str] = []
        for line in text.splitlines():
            message = _message(line)
            if message is None:
                continue
            if _FAILED.fullmatch(message):
                if self.failing_since is None:
                    self.failing_since = now
                self.failures += 1
            elif _REGISTERED.fullmatch(message) or _RECOVERED.fullmatch(message):
                messages.extend(self._connected(now))
        messages.extend(self.due(now))
        return messages

    def due(self, now: float) -> list[str]:
        """The "not answered" warning, when the failures have lasted long enough."""
        if self.failing_since is None:
            return []
        silent_s = now - self.failing_since
        if silent_s < self.next_warning_s:
            return []
        self.warned = True
        self.next_warning_s = min(silent_s * 2, silent_s + LONGEST_WARNING_GAP_S)
        was = "answered since it connected" if self.connected_once else "answered"
        return [
            f"the coordinator at {self.coordinator} has not {was} for "
            f"{silent_s:.0f} s ({self.failures} failed attempts); the SuperNode keeps "
            "trying. Check that the coordinator is running, that `[deployment] "
            "coordinator` in site.toml is its address and port, and that no "
            f"firewall blocks that port from this machine (the tries: {self.log_path})."
        ]

    def _connected(self, now: float) -> list[str]:
        first = not self.connected_once
        after = ""
        if self.failing_since is not None:
            after = f" after {now - self.failing_since:.0f} s of failed attempts"
        message: list[str] = []
        if first:
            message = [f"connected to the coordinator at {self.coordinator}{after}"]
        elif self.warned:
            message = [f"the coordinator at {self.coordinator} answers again{after}"]
        self.connected_once = True
        self.failing_since = None
        self.failures = 0
        self.warned = False
        self.next_warning_s = self.first_warning_s
        return message
