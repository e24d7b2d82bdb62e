"""Which site a Flower reply answers for.

A reply normally comes from the site it answers for. The SuperLink itself answers
for a site it has declared offline (``NODE_UNAVAILABLE``) or whose reply expired:
such a reply's sender is the SuperLink's own node id, and only the message it
replies to names the site. ``superlink_offline_reply`` is the SuperLink's own
function that makes such a reply (tests reproduce the offline answer with it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.server.superlink.linkstate.utils import (
    create_message_error_unavailable_res_message as superlink_offline_reply,
)

__all__ = [
    "addressee_of",
    "error_reason",
    "superlink_offline_reply",
    "site_went_away",
]

_GONE = frozenset(
    {
        ErrorCode.NODE_UNAVAILABLE,
        ErrorCode.MESSAGE_UNAVAILABLE,
        ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    }
)
"""Flower's errors for a site that went away: declared offline, or its reply or
arrays never arrived. Asked again once it is back, it may answer. Any other error
would likely come back the same; a crashed ClientApp (out of memory, say) would
crash again, and every ask would count against the site's answers and budget."""

_LATE_ARRAYS = (
    "its reply was announced but its arrays did not arrive within "
    "federation.round-timeout-s (the site died mid-upload, or its link is too slow "
    "for the adapter's size: raise round-timeout-s for large adapters)"
)


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


def error_reason(reply: Message) -> str:
    """Why an error reply failed, in words that say what to do.

    Flower's own message for arrays it gave up fetching speaks of an "object-push
    session"; the coordinator gives up on them at the round's deadline.
    """
    reason = reply.error.reason or ""
    if reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE:
        return f"{_LATE_ARRAYS}. Flower: {reason}"
    return reason


def site_went_away(reply: Message) -> bool:
    """Whether an error reply says the site went away rather than failed the task."""
    return reply.has_error() and reply.error.code in _GONE
