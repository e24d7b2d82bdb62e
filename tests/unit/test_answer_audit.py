"""A site's answer lines name the Flower run and the site's ledger key of the run."""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from wardround.client.answer_audit import make_answer_audit_mod
from wardround.ops.audit import AuditLog, filter_events, read_audit

FLOWER_RUN = 11056182493341478792
LEDGER_KEY = "a1" * 16

pytestmark = pytest.mark.usefixtures("task_identity")


def _answer(log: AuditLog, ledger_run_for=None) -> None:
    extra = {} if ledger_run_for is None else {"ledger_run_for": ledger_run_for}
    mod = make_answer_audit_mod(lambda context: log, **extra)
    context = Context(
        run_id=FLOWER_RUN,
        node_id=11,
        node_config={},
        state=RecordDict(),
        run_config={},
    )
    asked = Message(content=RecordDict(), dst_node_id=11, message_type="evaluate")

    def answer(msg: Message, ctx: Context) -> Message:
        return Message(
            RecordDict({"metrics": MetricRecord({"auroc": 0.7})}), reply_to=msg
        )

    mod(asked, context, answer)


def test_an_answer_line_names_the_sites_ledger_key_of_the_run(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", "site:site-01")
    _answer(log, lambda context: LEDGER_KEY)
    [line] = read_audit(log.path)
    assert line["event"] == "answer_sent"
    assert line["flower_run"] == FLOWER_RUN
    assert line["ledger_run"] == LEDGER_KEY
    # so `wardround audit --run KEY` (the key `wardround site privacy` shows) finds it
    assert filter_events([line], run=LEDGER_KEY) == [line]


def test_without_a_ledger_key_the_line_has_no_ledger_field(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", "site:site-01")
    _answer(log)
    [line] = read_audit(log.path)
    assert "ledger_run" not in line
    assert line["flower_run"] == FLOWER_RUN


@pytest.mark.parametrize(
    ("stage", "recorded"), [("setup", "setup"), ("bogus<x>", "other"), (7, "other")]
)
def test_a_secagg_stage_is_recorded_as_one_of_flowers_or_other(
    tmp_path, stage, recorded
):
    """The stage is the coordinator's text: a name the audit log refuses loses no line."""
    from flwr.app import ConfigRecord

    from wardround.flower_compat.secagg_protocol import RECORD_KEY_CONFIGS, Key

    log = AuditLog(tmp_path / "audit.jsonl", "site:site-01")
    mod = make_answer_audit_mod(lambda context: log)
    context = Context(
        run_id=FLOWER_RUN, node_id=11, node_config={}, state=RecordDict(),
        run_config={},
    )  # fmt: skip
    asked = Message(
        content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})}),
        dst_node_id=11,
        message_type="train",
    )

    def refuse(msg: Message, ctx: Context) -> Message:
        from flwr.app import Error

        return Message(Error(code=0, reason="unknown stage"), reply_to=msg)

    mod(asked, context, refuse)
    [line] = read_audit(log.path)
    assert line["event"] == "answer_refused"
    assert line["secagg_stage"] == recorded


def test_a_refusal_quoting_bytes_is_one_kind_whatever_the_bytes():
    from wardround.client.answer_audit import refusal_kind

    kinds = {
        refusal_kind(f"max_weight b'{n}AAAA' (approved: 1 to 2)") for n in range(5)
    }
    assert len(kinds) == 1
