"""The site's side of SecAgg+: Flower's ``secaggplus_mod``, enforced by the site.

The coordinator runs plain rounds (Message API) or SecAgg+ rounds (Flower's legacy
workflow); this mod hands only the latter to Flower's mod, so one ClientApp serves
both. What the site trusts is its approved run config, never the message:

* under a run that enables SecAgg+, the train handler answers only when called by
  Flower's mod at its masked-vector stage (:func:`require_secure_channel`); a plain
  train message, or a legacy FitIns sent outside the protocol, is refused;
* the setup values (shares, threshold, quantization) must be those the approved
  config gives for the announced participants (:func:`check_setup`);
* fewer than 3 participants is refused when the site learns them (share keys):
  Flower derives each pairwise mask from a 32-bit seed, so with 2 participants a
  coordinator that learned the self-mask seeds at unmask is a 2**32 search away
  from both vectors;
* the site masks with at least 2 others and unmasks only while at least 2 of
  them stay alive (a dropped partner's pairwise mask is rebuilt), and never for
  a node named both alive and dropped (both of its masks would be rebuilt).

Before the site joins a SecAgg+ round (the setup stage) it also checks that it
would train at all, so a refusal does not cost the others a key reconstruction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import cast

from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable

from ..common import wire
from ..common.config import RunConfig
from ..common.errors import SecureAggregationRefused
from ..common.secagg_math import (
    MIN_PARTICIPANTS,
    MODULUS_RANGE,
    plan_quantization,
    share_counts,
)
from ..flower_compat.legacy import recorddict_compat as compat
from ..flower_compat.secagg_protocol import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
    secaggplus_mod,
)
from ..flower_compat.secagg_wire import narrow_masked_vectors
from .answer_audit import Repeats, refusal_kind, worth_recording

log = logging.getLogger(__name__)

LEGACY_FITINS_ARRAYS = "fitins.parameters"
"""Where Flower's legacy FitIns carries the global adapter (unnamed arrays)."""

MAX_PLAUSIBLE_WEIGHT = 2.0**31
"""Largest SecAgg+ max weight accepted: far above any site's example count."""

SETUP_RECORD = "wardround.secagg-accepted"
"""Context state: what this site accepted in the current SecAgg+ round."""

_HINT = (
    "The coordinator must run the approved app unchanged: Flower's SecAgg+ workflow "
    "with the [secure-aggregation] settings of the run config this site approved. "
    "Check the coordinator's app hash, and see the site log."
)

Mod = Callable[[Message, Context, ClientAppCallable], Message]


@dataclass(frozen=True)
class _MaskingStage:
    """Set while Flower's SecAgg+ mod asks the handler for the vector it masks."""

    max_weight: float


_masking_stage: ContextVar[_MaskingStage | None] = ContextVar(
    "wardround_secagg_masking_stage", default=None
)


_refusals_logged = Repeats()


def _refuse(message: str) -> SecureAggregationRefused:
    # SecAgg+ messages cost the coordinator nothing: thinned like refused answers
    count = _refusals_logged.seen(refusal_kind(message))
    if worth_recording(count):
        log.warning(
            "secure aggregation refused%s: %s",
            f" ({count} times)" if count > 1 else "",
            message,
        )
    return SecureAggregationRefused(message, hint=_HINT)


QUOTED_CHARACTERS = 40
"""The most of a value from the coordinator's message a refusal quotes."""


def _quoted(value: object) -> str:
    """``repr(value)``, cut to :data:`QUOTED_CHARACTERS` (its closing quote kept)."""
    text = repr(value)
    if len(text) <= QUOTED_CHARACTERS:
        return text
    return text[: QUOTED_CHARACTERS - 2] + "…" + text[-1]


def is_secure_aggregation_message(msg: Message) -> bool:
    """A train message of Flower's SecAgg+ workflow."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def masking_now() -> bool:
    """Whether the handler runs inside Flower's SecAgg+ masked-vector stage.

    Its answer then leaves masked; a message's shape alone (a legacy FitIns) does
    not say so, since a run without SecAgg+ may receive one outside the protocol.
    """
    return _masking_stage.get() is not None


def require_secure_channel(msg: Message, config: RunConfig) -> None:
    """Refuse a train message outside SecAgg+ when the approved run enables it.

    Call first in the train handler, before any budget is reserved. Under SecAgg+
    the handler may only be reached through Flower's mod at its masked-vector
    stage, with a legacy FitIns whose max weight is the one accepted at setup.
    """
    if not config.secure_aggregation.enabled:
        return
    stage = _masking_stage.get()
    if stage is None or LEGACY_FITINS_ARRAYS not in msg.content:
        raise _refuse(
            "the approved run enables SecAgg+, and this train message is not part "
            "of Flower's SecAgg+ protocol (the site only trains for a masked reply)"
        )
    fit_config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
    max_weight = fit_config.get(wire.SECAGG_MAX_WEIGHT)
    if not isinstance(max_weight, (int, float)) or float(max_weight) != (
        stage.max_weight
    ):
        raise _refuse(
            f"the train instructions give max weight {_quoted(max_weight)}, the SecAgg+ "
            f"setup gave {stage.max_weight!r}"
        )


def check_setup(msg: Message, config: RunConfig) -> None:
    """Refuse SecAgg+ setup values that the approved run config does not give.

    Shares, threshold, clipping, quantization and modulus ranges are recomputed
    exactly for the announced number of participants (which must be at least
    ``federation.min-sites`` and 3); the max weight is a training-set size the
    site cannot know for the others, so it is only bounded.
    """
    if not config.secure_aggregation.enabled:
        return  # this run may train in the clear: SecAgg+ only adds protection
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    participants = configs.get(Key.SAMPLE_NUMBER)
    if not isinstance(participants, int) or isinstance(participants, bool):
        raise _refuse("the SecAgg+ setup does not say how many sites take part")
    fewest = max(MIN_PARTICIPANTS, config.federation.min_sites)
    if participants < fewest:
        raise _refuse(
            f"the SecAgg+ setup announces {participants} participant(s); the "
            f"approved run needs at least {fewest}"
        )
    settings = config.secure_aggregation
    shares = share_counts(
        settings.num_shares, settings.reconstruction_threshold, participants
    )
    plan = plan_quantization(config.federation.delta_clip_norm, participants, 1)
    expected: dict[str, int | float] = {
        Key.SHARE_NUMBER: shares.num_shares,
        Key.THRESHOLD: shares.threshold,
        Key.CLIPPING_RANGE: plan.clipping_range,
        Key.TARGET_RANGE: plan.quantization_range,
        Key.MOD_RANGE: MODULUS_RANGE,
    }
    differences = [
        f"{key} {_quoted(configs.get(key))} (approved: {value!r})"
        for key, value in expected.items()
        if type(configs.get(key)) is not type(value) or configs.get(key) != value
    ]
    max_weight = configs.get(Key.MAX_WEIGHT)
    if (
        not isinstance(max_weight, float)
        or not math.isfinite(max_weight)
        or not 1.0 <= max_weight <= MAX_PLAUSIBLE_WEIGHT
    ):
        differences.append(
            f"{Key.MAX_WEIGHT} {_quoted(max_weight)} (approved: an example count from 1 to "
            f"{MAX_PLAUSIBLE_WEIGHT:.0f})"
        )
    if differences:
        raise _refuse(
            f"the SecAgg+ setup for {participants} participants differs from the "
            "approved run config: " + "; ".join(differences)
        )
    if 2 * shares.threshold <= shares.num_shares:
        raise _refuse(
            f"the approved threshold {shares.threshold} of {shares.num_shares} "
            "shares is not above half: a coordinator that names a site alive to "
            "some and dropped to others could rebuild both of its masks",
        )


def check_participants(configs: ConfigRecord, announced: int | None) -> None:
    """At share keys: refuse fewer than 3 participants, or more than announced."""
    participants = sum(1 for key in configs if key != Key.STAGE)
    if participants < MIN_PARTICIPANTS:
        raise _refuse(
            f"SecAgg+ with {participants} participant(s) (this site included); at "
            f"least {MIN_PARTICIPANTS} are needed: with 2, the one pairwise mask "
            "comes from a 32-bit seed a coordinator can search"
        )
    if announced is not None and participants > announced:
        raise _refuse(
            f"SecAgg+ share keys name {participants} participants, setup "
            f"announced {announced}"
        )


def check_mask_partners(configs: ConfigRecord, node_id: int) -> list[int]:
    """At masked vectors: the site masks with whoever sent it key shares.

    Returns those partners; fewer than 2 (3 with this site) is refused.
    """
    sources = configs.get(Key.SOURCE_LIST)
    partners = sorted(
        {s for s in sources if isinstance(s, int) and s != node_id}
        if isinstance(sources, list)
        else set()
    )
    if len(partners) < MIN_PARTICIPANTS - 1:
        raise _refuse(
            f"SecAgg+ would mask this site's update with {len(partners)} other "
            f"site(s); at least {MIN_PARTICIPANTS - 1} are needed"
        )
    return partners


def check_unmask_request(
    configs: ConfigRecord, node_id: int, partners: list[int] | None
) -> None:
    """At unmask: share only if at least 2 mask partners stay alive.

    A node named both alive and dropped would have both of its masks rebuilt;
    a partner named dropped has its pairwise mask with this site rebuilt, so
    fewer than 2 live partners leave this site's vector behind one 32-bit seed.
    """
    alive = configs.get(Key.ACTIVE_NODE_ID_LIST)
    dropped = configs.get(Key.DEAD_NODE_ID_LIST)
    alive_ids = set(alive) if isinstance(alive, list) else set()
    dropped_ids = set(dropped) if isinstance(dropped, list) else set()
    if alive_ids & dropped_ids:
        raise _refuse(
            f"the unmask request names {len(alive_ids & dropped_ids)} node(s) both "
            "alive and dropped; answering would reveal both of their masks"
        )
    if node_id not in alive_ids or node_id in dropped_ids:
        raise _refuse("the unmask request does not name this site alive")
    live_partners = len(alive_ids & set(partners or ()))
    if live_partners < MIN_PARTICIPANTS - 1:
        raise _refuse(
            f"the unmask request leaves {live_partners} of this site's mask "
            f"partners alive; at least {MIN_PARTICIPANTS - 1} are needed (the "
            "round has too few sites left to aggregate securely)"
        )


def _flower_secaggplus(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    masking: _MaskingStage | None,
) -> Message:
    # Module level: the ClientApp is pickled for Ray, and a ContextVar cannot be.
    token = _masking_stage.set(masking)
    try:
        return secaggplus_mod(msg, context, call_next)
    finally:
        _masking_stage.reset(token)


def _accepted(context: Context) -> ConfigRecord:
    return context.state.config_records.get(SETUP_RECORD) or ConfigRecord()


def make_secure_aggregation_mod(precheck: Callable[[Message, Context], None]) -> Mod:
    """A mod running Flower's ``secaggplus_mod`` on SecAgg+ messages only.

    ``precheck`` runs at the setup stage and raises if the site would not train
    or the setup values are not the approved ones (:func:`check_setup`). What the
    site accepted (participants, max weight, mask partners) is kept in the
    context's state for the later stages.
    """

    def secure_aggregation_mod(
        msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        if not is_secure_aggregation_message(msg):
            return call_next(msg, context)
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        stage = configs.get(Key.STAGE)
        node_id = int(msg.metadata.dst_node_id)
        accepted = _accepted(context)
        masking = None
        if stage == Stage.SETUP:
            context.state.config_records.pop(SETUP_RECORD, None)
            precheck(msg, context)
            keep = (Key.SAMPLE_NUMBER, Key.MAX_WEIGHT)
            accepted = ConfigRecord({k: configs[k] for k in keep if k in configs})
        elif stage == Stage.SHARE_KEYS:
            announced = accepted.get(Key.SAMPLE_NUMBER)
            check_participants(
                configs, announced if isinstance(announced, int) else None
            )
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            accepted[Key.SOURCE_LIST] = check_mask_partners(configs, node_id)
            max_weight = accepted.get(Key.MAX_WEIGHT)
            if isinstance(max_weight, float):
                masking = _MaskingStage(max_weight)
        elif stage == Stage.UNMASK:
            partners = accepted.get(Key.SOURCE_LIST)
            # Only this mod writes SOURCE_LIST (check_mask_partners' list[int] above).
            check_unmask_request(
                configs,
                node_id,
                cast(list[int], partners) if isinstance(partners, list) else None,
            )
        reply = _flower_secaggplus(msg, context, call_next, masking)
        context.state.config_records[SETUP_RECORD] = accepted
        return narrow_masked_vectors(reply)

    return secure_aggregation_mod
