"""Flower client mods at the site's edge: the egress guard and error sanitizing.

Outermost first in the ClientApp: ``error_sanitizing_mod`` (a failing handler
replies with a sanitized reason, never ``str(exception)``), then the egress guard
(every reply checked against the allowlist before it leaves).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from ..common.errors import EgressViolation, PolicyRefusal, safe_error_reason
from ..flower_compat.constants import ErrorCode
from ..flower_compat.secagg_protocol import Key, Stage
from .egress import (
    FITRES_PARAMETERS,
    SECAGG_CONFIGS,
    EgressAllowlist,
    _refuse,
    _unlisted,
    check_legacy_fitres,
    check_reply,
)
from .egress_secagg import check_secagg_reply, secagg_stage_of

log = logging.getLogger("wardround.egress")


def _incoming_secagg_stage(msg: Message) -> str | None:
    if not msg.has_content():
        return None
    configs = msg.content.config_records.get(SECAGG_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    return stage if isinstance(stage, str) else None


def _check_outgoing(
    msg: Message,
    ctx: Context,
    reply: Message,
    incoming_stage: str | None,
    allowlist_for: Callable[[Message, Context], EgressAllowlist],
) -> None:
    content = reply.content
    configs = content.get(SECAGG_CONFIGS)
    if configs is not None:
        stage = incoming_stage
        if stage is None and isinstance(configs, ConfigRecord):
            stage = secagg_stage_of(configs)
        if stage is None:
            _refuse("SecAgg+ reply", ["its config keys match no SecAgg+ stage"])
        collect = stage == Stage.COLLECT_MASKED_VECTORS
        check_secagg_reply(content, allowlist_for(msg, ctx) if collect else None, stage)
    elif FITRES_PARAMETERS in content:
        check_legacy_fitres(content, allowlist_for(msg, ctx))
    else:
        kind = msg.metadata.message_type.split(".", 1)[0]
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
            _refuse(
                "reply", [f"no egress allowlist for message type {_unlisted(kind)}"]
            )
        check_reply(content, allowlist_for(msg, ctx), kind=kind)


def _append_violation(path: Path, msg: Message, violation: EgressViolation) -> None:
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": msg.metadata.run_id,
        "message_type": msg.metadata.message_type,
        "violation": violation.message,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry) + "\n")
    except OSError:
        log.exception("could not append to the egress violations log %s", path)


def make_egress_guard_mod(
    allowlist_for: Callable[[Message, Context], EgressAllowlist],
    *,
    violations_log: Path | Callable[[Context], Path | None] | None = None,
    raise_violations: bool = False,
) -> Mod:
    """A Flower client mod that refuses any reply outside the allowlist.

    Parameters
    ----------
    allowlist_for : callable
        ``(message, context) -> EgressAllowlist``; called after the handler ran, and
        not at all for error replies or for SecAgg+ stages that carry no vectors.
    violations_log : Path or callable, optional
        An append-only JSONL file (or ``context -> path``): one line per refused reply (time, run id, message
        type, the violation text; never values).
    raise_violations : bool
        Raise the :class:`EgressViolation` instead of replying with an error. Needed
        below Flower's SecAgg+ mod, which cannot handle an error reply (it reads the
        reply's content); :func:`error_sanitizing_mod` above turns it into one.

    Returns
    -------
    Mod
        A mod that returns an error reply (``MOD_FAILED_PRECONDITION``, reason from
        :func:`safe_error_reason`) in place of a refused reply.
    """

    def egress_guard_mod(
        msg: Message, ctx: Context, call_next: ClientAppCallable
    ) -> Message:
        # Flower's SecAgg+ mod pops the stage from the incoming configs: read it first.
        incoming_stage = _incoming_secagg_stage(msg)
        reply = call_next(msg, ctx)
        if reply.has_error():
            return reply
        try:
            _check_outgoing(msg, ctx, reply, incoming_stage, allowlist_for)
        except EgressViolation as violation:
            if violations_log is not None:
                path = (
                    violations_log(ctx) if callable(violations_log) else violations_log
                )
                if path is not None:
                    _append_violation(Path(path), msg, violation)
            if raise_violations:
                raise
            error = Error(
                code=ErrorCode.MOD_FAILED_PRECONDITION,
                reason=safe_error_reason(violation),
            )
            return Message(error, reply_to=msg)
        return reply

    return egress_guard_mod


def error_sanitizing_mod(
    msg: Message, ctx: Context, call_next: ClientAppCallable
) -> Message:
    """A Flower client mod: a failing handler replies with :func:`safe_error_reason`.

    Without it Flower sends ``str(exception)`` to the coordinator. The exception is
    logged locally: a :class:`PolicyRefusal` (the site's policy said no) as one
    warning with its message, anything else with its traceback. Put it outermost.
    """
    try:
        return call_next(msg, ctx)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, sanitised
        if isinstance(exc, PolicyRefusal):
            # Expected, and its message says why: a traceback would only bury it.
            log.warning(
                "refused the %s message: %s",
                msg.metadata.message_type,
                " ".join(f"{exc.title}: {exc}".split()),
            )
        else:
            log.exception("the %s handler failed", msg.metadata.message_type)
        error = Error(
            code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=safe_error_reason(exc)
        )
        return Message(error, reply_to=msg)


def site_mods(
    allowlist_for: Callable[[Message, Context], EgressAllowlist],
    *,
    precheck: Callable[[Message, Context], None],
    violations_log: Path | Callable[[Context], Path | None] | None = None,
) -> list[Mod]:
    """The site's client mods in their pinned order, outermost first.

    ``error_sanitizing_mod`` → egress guard → SecAgg+ (SecAgg+ messages only) →
    inner egress guard. The inner guard sees the handler's reply before Flower's
    SecAgg+ mod quantizes and masks it (NaNs, shapes); it raises rather than
    replying because that mod cannot handle an error reply.
    """
    from .secure_aggregation import make_secure_aggregation_mod

    return [
        error_sanitizing_mod,
        make_egress_guard_mod(allowlist_for, violations_log=violations_log),
        make_secure_aggregation_mod(precheck),
        make_egress_guard_mod(
            allowlist_for, violations_log=violations_log, raise_violations=True
        ),
    ]
