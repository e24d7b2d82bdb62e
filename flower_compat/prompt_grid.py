"""A Flower ``Grid`` that collects replies promptly.

Flower 1.41's deployment Grid checks for replies every 3 s inside
``send_and_receive``. A SecAgg+ round is five request/reply exchanges, so that
wait alone adds up to 15 s per round. :class:`PromptGrid` wraps any Grid and
implements ``send_and_receive`` with the Grid's own ``push_messages`` and
``pull_messages``, checking every ``poll_s``; everything else is delegated.

Its ``send_and_receive`` also keeps the exchange's deadline: reply arrays are not
fetched past it (:func:`~.pacing.pulls_end_by`), and a fetch that ran into the
deadline is followed by one last check, so replies that came in meanwhile count.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from .pacing import pulls_end_by

FLOWER_REPLY_POLL_S = 3.0
"""How often Flower's own ``send_and_receive`` checks for replies."""


class PromptGrid(Grid):
    """Delegate to ``grid``; poll for replies every ``poll_s`` seconds."""

    def __init__(self, grid: Grid, poll_s: float = 0.1) -> None:
        self.inner = grid
        self.poll_s = poll_s

    def set_run(self, run_id: Any) -> None:  # noqa: D102
        self.inner.set_run(run_id)

    @property
    def run(self) -> Any:  # noqa: D102
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; collect replies until all are in or ``timeout`` passes."""
        waiting = set(self.inner.push_messages(messages))
        waiting.discard("")  # a message the SuperLink did not store has no reply
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        with pulls_end_by(deadline):
            while waiting:
                checked_at = time.monotonic()
                pulled = list(self.inner.pull_messages(waiting))
                replies.extend(pulled)
                waiting.difference_update(
                    m.metadata.reply_to_message_id for m in pulled
                )
                if not waiting or (deadline is not None and checked_at >= deadline):
                    break
                if deadline is None or time.monotonic() < deadline:
                    time.sleep(self.poll_s)
        return replies

    def __getattr__(self, name: str) -> Any:
        # Anything else a Grid implementation offers (e.g. close) goes to the inner one.
        return getattr(self.inner, name)
