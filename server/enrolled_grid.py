"""A Flower ``Grid`` that shows the ServerApp only the sites enrolled by the admin.

Flower's SuperLink admits any node whose public key was registered through its
Control API, by whoever could reach it. The coordinator keeps, in ``sites.json``,
the node id the SuperLink gave each key that ``wardround sites add`` registered.
:class:`EnrolledGrid` wraps the run's grid so that everything the ServerApp
samples from (Flower's strategies, SecAgg+, the join wait) sees only the node ids
of active (not revoked) enrolled sites. A connected node that is not one of them
is never sampled, never sent a message, and its appearance is recorded once per
run in the coordinator's audit log (``node_ignored``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

from flwr.app import Message
from flwr.serverapp import Grid

from ..common.errors import FederationError

log = logging.getLogger(__name__)


class Roster(Protocol):
    """The enrolled sites (:class:`~wardround.server.deployment.SiteRoster`)."""

    def expected_nodes(self) -> list[int]:
        """Node ids of the enrolled sites that are not revoked."""


class Recorder(Protocol):
    """The coordinator's audit log."""

    def record(self, event: str, **fields: Any) -> Any:
        """Append one event."""


class EnrolledGrid(Grid):
    """Delegate to ``grid``, keeping nodes that are not enrolled out of the run.

    Parameters
    ----------
    grid
        The run's grid (Flower's, or a wrapper of it).
    roster
        The enrolled sites; re-read as ``sites.json`` changes.
    recorder
        Where a node outside the roster is recorded.
    run_id
        The run's name, for the audit lines.
    """

    def __init__(
        self, grid: Grid, roster: Roster, recorder: Recorder, run_id: str
    ) -> None:
        self.inner = grid
        self.roster = roster
        self.recorder = recorder
        self.run_id = run_id
        self.ignored: set[int] = set()

    def set_run(self, run: Any) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes that are active enrolled sites."""
        enrolled = set(self.roster.expected_nodes())
        connected = [int(n) for n in self.inner.get_node_ids()]
        for node in connected:
            if node not in enrolled and node not in self.ignored:
                self.ignored.add(node)
                log.warning("node %d is connected but not enrolled: ignored", node)
                self.recorder.record(
                    "node_ignored",
                    run_id=self.run_id,
                    node_id=str(node),
                    reason="connected to the SuperLink but not enrolled with "
                    "wardround sites add (or revoked)",
                )
        return [n for n in connected if n in enrolled]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages``; refuse any addressed to a node that is not enrolled."""
        messages = list(messages)
        enrolled = set(self.roster.expected_nodes())
        strangers = sorted(
            {m.metadata.dst_node_id for m in messages} - enrolled, key=int
        )
        if strangers:
            raise FederationError(
                f"refused to send to node(s) {strangers}: not enrolled sites",
                hint="Enrol a site with `wardround sites add`.",
            )
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Flower's own."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's own send-and-receive, after the same check as ``push_messages``."""
        messages = list(messages)
        enrolled = set(self.roster.expected_nodes())
        if {m.metadata.dst_node_id for m in messages} - enrolled:
            self.push_messages(messages)  # raises, naming the nodes
        return self.inner.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
