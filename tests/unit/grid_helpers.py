"""A Flower Grid with nothing behind it, for tests that supply its exchanges."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class StubGrid(Grid):
    """Flower's Grid interface over a fixed set of nodes; nothing is ever delivered.

    Subclasses override ``push_messages`` or ``send_and_receive`` with what their
    test needs.
    """

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)

    def set_run(self, run_id: int) -> None:
        """Not needed here."""

    @property
    def run(self) -> Any:
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return []

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return []

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        return []
