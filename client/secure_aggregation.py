"""The site's side of SecAgg+: Flower's ``secaggplus_mod``, for SecAgg+ messages only.

The coordinator runs plain rounds (Message API) or SecAgg+ rounds (Flower's legacy
workflow); this mod hands only the latter to Flower's mod, so one ClientApp serves
both. Before the site joins a SecAgg+ round (the setup stage) it checks that it
would train at all, so a refusal does not cost the others a key reconstruction.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)

from ..common.secagg_wire import narrow_masked_vectors

LEGACY_FITINS_ARRAYS = "fitins.parameters"
"""Where Flower's legacy FitIns carries the global adapter (unnamed arrays)."""

Mod = Callable[[Message, Context, ClientAppCallable], Message]


def is_secure_aggregation_message(msg: Message) -> bool:
    """A train message of Flower's SecAgg+ workflow."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def make_secure_aggregation_mod(precheck: Callable[[Message, Context], None]) -> Mod:
    """A mod running Flower's ``secaggplus_mod`` on SecAgg+ messages only.

    ``precheck`` runs at the setup stage and raises if the site would not train.
    """

    def secure_aggregation_mod(
        msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        if not is_secure_aggregation_message(msg):
            return call_next(msg, context)
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        if stage == Stage.SETUP:
            precheck(msg, context)
        return narrow_masked_vectors(secaggplus_mod(msg, context, call_next))

    return secure_aggregation_mod
