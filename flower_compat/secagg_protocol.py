"""Flower's SecAgg+ client side: its mod, its record keys and stages, its key encoding.

The site runs Flower's ``secaggplus_mod`` and checks what each stage sends
(:mod:`wardround.client.egress_secagg`); those checks need the protocol's own
names, which live in Flower's private modules. ``make_ffn`` chains mods the way a
ClientApp does (the site's tests run the mod stack with it).
"""

from __future__ import annotations

from flwr.client.mod import secaggplus_mod
from flwr.client.mod.utils import make_ffn
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    public_key_to_bytes,
)

__all__ = [
    "RECORD_KEY_CONFIGS",
    "Key",
    "Stage",
    "bytes_to_public_key",
    "make_ffn",
    "public_key_to_bytes",
    "secaggplus_mod",
]
