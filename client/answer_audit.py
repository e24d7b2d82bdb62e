"""Every answer the site gives, or refuses, goes into the site's audit log.

The outermost client mod: it sees the reply exactly as it leaves (after the egress
guard and error sanitizing) and records the message type, the round, the SecAgg+
stage, the numbers that left and the bytes, or the refusal's controlled reason.
Never a tensor, never text from data: the audit log's own field guard refuses
anything else.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable, Mod

from ..common import wire
from ..common.errors import DataError
from ..common.wirebytes import content_bytes
from ..flower_compat.secagg_protocol import RECORD_KEY_CONFIGS, Key, Stage
from ..ops.audit import AuditEvent, AuditLog, safe_reason
from .replay import clear_replayed, replayed_round

log = logging.getLogger(__name__)


def _round_of(msg: Message) -> int | None:
    for record in msg.content.config_records.values():
        value = wire.round_number(record.get(wire.SERVER_ROUND))
        if value is not None:
            return value
    return None


_STAGES = frozenset(Stage.all())


def _stage_of(msg: Message) -> str | None:
    """The SecAgg+ stage a message names: one of Flower's, or ``other``.

    The stage is the coordinator's text; recorded as it is, a character the audit
    log refuses would cost the answer's line.
    """
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    if stage is None:
        return None
    return stage if isinstance(stage, str) and stage in _STAGES else "other"


def _numbers_sent(reply: Message) -> dict[str, float | int]:
    numbers: dict[str, float | int] = {}
    content = reply.content
    records: list[MetricRecord | ConfigRecord] = [
        *content.metric_records.values(),
        *content.config_records.values(),
    ]
    for record in records:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[key] = value
    return numbers


REFUSALS_IN_FULL = 10
"""The first refusals of one kind each get a line; after that only the 20th, 30th,
..., 100th, 200th, ... (with the count): nine lines a decade, so a coordinator that
repeats a refused message cannot fill the site's disk through its audit log."""
_TRACKED_REFUSALS = 1024


def worth_recording(count: int) -> bool:
    """Whether the ``count``-th identical refusal gets its own audit line."""
    if count <= REFUSALS_IN_FULL:
        return True
    while count % 10 == 0:
        count //= 10
    return count < 10


class Repeats:
    """How often each kind of refusal has been seen (the newest kinds kept).

    A kind's key must hold nothing the coordinator chooses freely (a round number,
    a run name, a version text): one that varied it would get a line each time.
    """

    def __init__(self) -> None:
        self._counts: OrderedDict[tuple[str, ...], int] = OrderedDict()

    def seen(self, *key: str) -> int:
        """How often this kind has been seen, this one included."""
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count
        while len(self._counts) > _TRACKED_REFUSALS:
            self._counts.popitem(last=False)
        return count


_CHOSEN_PARTS = re.compile(
    r"(?<!\w)b?('[^']*'|\"[^\"]*\")|[0-9a-fA-F]{6,}…?|\d+(\.\d+)?"
)
"""What a refusal's text may quote from the coordinator's message: quoted values,
bytes included (a version, a payload kind), fingerprints and numbers (a round)."""


def refusal_kind(reason: object) -> str:
    """What identifies a refusal for thinning: its text without what the message chose.

    The text may carry the coordinator's round number, version or fingerprint; a
    new reason (another limit reached, a full disk) is a new kind, and is recorded.
    """
    return _CHOSEN_PARTS.sub("#", str(reason))[:300]


def make_answer_audit_mod(
    audit_for: Callable[[Context], AuditLog | None],
    ledger_run_for: Callable[[Context], str | None] = lambda context: None,
) -> Mod:
    """A mod that records each reply in ``audit_for(context)`` (None: not audited).

    Every answer sent is recorded; identical refusals, and an answer sent again
    to a repeated question (:mod:`wardround.client.replay`), are thinned out past
    :data:`REFUSALS_IN_FULL` (see :func:`worth_recording`). A line names the
    Flower run and, when ``ledger_run_for`` knows it, the run's key in the site's
    privacy ledger (``ledger_run``), the run that ``wardround site privacy`` shows,
    so ``wardround audit --run`` finds the answers by either.
    """
    repeats = Repeats()

    def answer_audit_mod(
        msg: Message, ctx: Context, call_next: ClientAppCallable
    ) -> Message:
        fields: dict[str, Any] = {
            "flower_run": int(ctx.run_id),
            "message_type": str(msg.metadata.message_type),
            "round": _round_of(msg) if msg.has_content() else None,
            "secagg_stage": _stage_of(msg) if msg.has_content() else None,
        }
        clear_replayed()
        reply = call_next(msg, ctx)
        replayed = replayed_round()
        try:
            audit = audit_for(ctx)
            if audit is None:
                return reply
            ledger_run = ledger_run_for(ctx)
            if ledger_run is not None:
                fields["ledger_run"] = ledger_run
            # Thinned per approved run, not per Flower run: the coordinator picks those.
            thread = ledger_run or ""
            if reply.has_error():
                reason = safe_reason(str(reply.error.reason))
                count = repeats.seen(
                    thread, fields["message_type"], refusal_kind(reply.error.reason)
                )
                if worth_recording(count):
                    audit.record(
                        AuditEvent.ANSWER_REFUSED,
                        **fields,
                        reason=reason,
                        repeated=count,
                    )
            elif replayed is not None:
                # The same answer again (a resumed round): thinned like refusals,
                # so a coordinator repeating a question cannot fill the disk.
                count = repeats.seen(thread, fields["message_type"], "replay")
                if worth_recording(count):
                    audit.record(
                        AuditEvent.ANSWER_REPLAYED,
                        **fields,
                        bytes_out=int(content_bytes(reply.content)),
                        repeated=count,
                    )
            else:
                audit.record(
                    AuditEvent.ANSWER_SENT,
                    **fields,
                    numbers=_numbers_sent(reply),
                    bytes_out=int(content_bytes(reply.content)),
                )
        except (ValueError, DataError, OSError) as exc:  # never blocks an answer
            log.error("could not audit an answer: %s", exc)
        return reply

    return answer_audit_mod
