"""Which site a Flower reply answers for.

A reply normally comes from the site it answers for. The SuperLink itself answers
for a site it has declared offline (``NODE_UNAVAILABLE``) or whose reply expired:
such a reply's sender is the SuperLink's own node id, and only the message it
replies to names the site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message

__all__ = ["addressee_of"]


def addressee_of(sent: Iterable[Message]) -> Callable[[Message], int]:
    """``reply -> node id`` of the site the reply answers for.

    ``sent`` are the messages the grid pushed; pushing gave each its message id.
    A reply to none of them is attributed to its sender.
    """
    addressee = {
        m.metadata.message_id: int(m.metadata.dst_node_id)
        for m in sent
        if m.metadata.message_id
    }

    def node_of(reply: Message) -> int:
        return addressee.get(
            reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id)
        )

    return node_of
