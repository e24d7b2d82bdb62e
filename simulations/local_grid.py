"""A Flower ``Grid`` that delivers messages to ClientApps in this process.

For protocol tests and benchmarks of one round (SecAgg+ vs plain) without Ray's
start-up and scheduling noise. Every message in both directions goes through
Flower's protobuf encoding, so nothing is shared by reference and the byte counts
are those on the wire. A site can be made to vanish at a chosen message: from then
on it never replies, as a killed site daemon would not.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from ..flower_compat.constants import SUPERLINK_NODE_ID
from ..flower_compat.runtime import (
    ProtoMessage,
    Run,
    TaskIdentity,
    message_from_proto,
    message_to_proto,
)
from ..flower_compat.secagg_protocol import RECORD_KEY_CONFIGS, Key

VanishRule = Callable[[int, Message], bool]
"""(node id, incoming message) -> True if the site dies on receiving it."""


def vanish_at_secagg_stage(stage: str, nodes: Iterable[int]) -> VanishRule:
    """These nodes die on receiving the SecAgg+ message of ``stage``."""
    doomed = set(nodes)

    def rule(node: int, msg: Message) -> bool:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        return (
            node in doomed and configs is not None and configs.get(Key.STAGE) == stage
        )

    return rule


@dataclass
class Traffic:
    """Bytes on the wire per node, both directions."""

    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    messages: int = 0
    site_seconds: dict[int, float] = field(default_factory=dict)
    """Time each node's ClientApp spent in the last exchange."""


def _roundtrip(message: Message) -> tuple[Message, int]:
    data = message_to_proto(message).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto), len(data)


class LocalGrid(Grid):
    """Runs each addressed node's ClientApp synchronously, in node-id order."""

    def __init__(
        self,
        apps: Mapping[int, ClientApp],
        node_configs: Mapping[int, dict],
        run_config: dict,
        *,
        run_id: int = 1,
        vanish: VanishRule | None = None,
    ) -> None:
        self._apps = dict(apps)
        self._contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config=dict(node_configs[node]),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node in apps
        }
        self._run = Run.create_empty(run_id)
        self._vanish = vanish
        self.dead: set[int] = set()
        self.traffic = Traffic()
        self._pending: dict[str, Message] = {}
        self.sites_serial_seconds = 0.0
        self.sites_parallel_seconds = 0.0
        TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def set_run(self, run: Run) -> None:
        """Serve another run."""
        self._run = run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message to a node (Flower's deprecated helper, kept for the interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The nodes still alive."""
        return [n for n in sorted(self._apps) if n not in self.dead]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message and run its node's ClientApp now."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = int(msg.metadata.dst_node_id)
            delivered, size = _roundtrip(msg)
            self.traffic.down[node] = self.traffic.down.get(node, 0) + size
            self.traffic.messages += 1
            if node in self.dead or (self._vanish and self._vanish(node, delivered)):
                self.dead.add(node)
                continue
            TaskIdentity.node_id = node
            started = time.perf_counter()
            try:
                reply = self._apps[node](delivered, self._contexts[node])
            finally:
                TaskIdentity.node_id = SUPERLINK_NODE_ID
                self.traffic.site_seconds[node] = time.perf_counter() - started
            returned, size = _roundtrip(reply)
            self.traffic.up[node] = self.traffic.up.get(node, 0) + size
            self._pending[msg.metadata.message_id] = returned
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that exist for these message ids (vanished nodes have none)."""
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver and collect; a vanished node's reply is simply missing.

        Sites run one after another here; ``sites_serial_seconds`` and
        ``sites_parallel_seconds`` let a caller restate a round's time as if the
        sites had worked at the same time, as they do in a deployment.
        """
        self.traffic.site_seconds = {}
        replies = list(self.pull_messages(self.push_messages(messages)))
        sites = self.traffic.site_seconds.values()
        self.sites_serial_seconds += sum(sites)
        self.sites_parallel_seconds += max(sites, default=0.0)
        return replies

    def as_if_parallel(self, wall_seconds: float) -> float:
        """``wall_seconds`` of work on this grid, had the sites worked concurrently."""
        return wall_seconds - self.sites_serial_seconds + self.sites_parallel_seconds
