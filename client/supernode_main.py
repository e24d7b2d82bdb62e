"""Run Flower's SuperNode, paced for short rounds (``python -m wardround.client.supernode_main``).

The site daemon starts the SuperNode through this module rather than
``flower-supernode``: it applies :func:`wardround.flower_compat.pacing.pace_supernode`
with ``WARDROUND_SUPERNODE_POLL_S`` (from ``deployment.poll-interval-s``), then runs
Flower's own SuperNode entry point, with the same arguments. Its log lines are
kept to one line of printable text each (:class:`OneLineRecords`).
"""

from __future__ import annotations

import logging
import os
import sys

POLL_ENV = "WARDROUND_SUPERNODE_POLL_S"


def escaped(text: str) -> str:
    """``text`` with every control and format character written as an escape."""
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


class OneLineRecords(logging.Filter):
    """Writes each of Flower's log messages as one line of printable text.

    The SuperNode logs text the coordinator chooses (each message's group id,
    servers' error details) into ``<state-dir>/supernode.log``, which the daemon
    reads for connection events and the operator reads with ``cat``: a newline
    there could forge a line, an escape sequence act on a terminal.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message, escaped; never drop it.

        An exception or stack attached to the record (its text may quote a server's
        error details) joins the message, escaped, rather than being appended raw.
        """
        message = record.getMessage()
        attached = [
            logging.Formatter().formatException(record.exc_info)
            if record.exc_info
            else record.exc_text or "",
            record.stack_info or "",
        ]
        whole = "\n".join([message, *(text for text in attached if text)])
        safe = escaped(whole)
        if safe != message:
            record.msg, record.args = safe, ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def main() -> int:
    """Flower's ``flower-supernode``, with the pacing from the environment."""
    from ..flower_compat.flower_logging import filter_flower_records
    from ..flower_compat.pacing import pace_supernode
    from ..flower_compat.tools import flower_supernode

    filter_flower_records(OneLineRecords())

    poll = float(os.environ.get(POLL_ENV, "0") or 0)
    if poll > 0:
        pace_supernode(poll)
    sys.argv[0] = "flower-supernode"
    flower_supernode()  # never returns a value (-> None), so the status was always 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
