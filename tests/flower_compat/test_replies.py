"""A reply is the answer of the site its message went to, whoever sent it."""

from __future__ import annotations

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import (
    create_message_error_unavailable_res_message,
)

from wardround.flower_compat.replies import addressee_of

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a run


def _pushed(node: int) -> Message:
    msg = Message(RecordDict(), dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grids push
    return msg


def test_the_superlinks_answer_for_an_offline_site_names_that_site():
    sent = [_pushed(101), _pushed(102)]
    answer = create_message_error_unavailable_res_message(
        sent[1].metadata, "node_unavail"
    )
    assert answer.metadata.src_node_id != 102  # the SuperLink sends it

    assert addressee_of(sent)(answer) == 102


def test_a_sites_own_reply_names_the_site():
    sent = [_pushed(101)]
    reply = Message(RecordDict({"m": MetricRecord({"x": 1})}), reply_to=sent[0])

    assert addressee_of(sent)(reply) == 101


def test_a_reply_to_no_message_sent_is_its_senders():
    unrelated = _pushed(103)
    reply = Message(RecordDict(), reply_to=unrelated)

    assert addressee_of([_pushed(101)])(reply) == int(reply.metadata.src_node_id)


def test_arrays_given_up_at_the_deadline_are_explained_with_the_setting_to_change():
    from flwr.common import Error
    from flwr.common.constant import ErrorCode

    from wardround.flower_compat.replies import error_reason

    sent = _pushed(101)
    late = Message(
        error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="object-push session"),
        reply_to=sent,
    )
    other = Message(error=Error(code=ErrorCode.UNKNOWN, reason="boom"), reply_to=sent)

    assert "federation.round-timeout-s" in error_reason(late)
    assert error_reason(late).endswith("Flower: object-push session")
    assert error_reason(other) == "boom"
