"""Egress checks for what Flower's SecAgg+ mod sends back at each protocol stage.

Keys, public keys, ciphertexts and shares have fixed types; the masked vectors must
be exactly the allowlist's tensors (plus the weight factor), as non-negative integers.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from ..flower_compat.secagg_protocol import (
    Key,
    Stage,
    bytes_to_public_key,
    public_key_to_bytes,
)
from .egress import (
    _FITRES_LAYOUT,
    SECAGG_CONFIGS,
    EgressAllowlist,
    _decode,
    _dtype_text,
    _fitres_records,
    _layout,
    _raise_if,
    _refuse,
    _unlisted,
)

_SECAGG_REPLY_KEYS: dict[str, dict[str, str]] = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: "bytes", Key.PUBLIC_KEY_2: "bytes"},
    Stage.SHARE_KEYS: {
        Key.DESTINATION_LIST: "list[int]",
        Key.CIPHERTEXT_LIST: "list[bytes]",
    },
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: "list[bytes]"},
    Stage.UNMASK: {Key.NODE_ID_LIST: "list[int]", Key.SHARE_LIST: "list[bytes]"},
}


def _typed(value: object, spec: str) -> bool:
    if spec == "bytes":
        return type(value) is bytes
    item = {"list[int]": int, "list[bytes]": bytes}[spec]
    return isinstance(value, list) and all(type(v) is item for v in value)


def _public_key(value: object) -> bool:
    if not isinstance(value, bytes):
        return False
    try:
        return public_key_to_bytes(bytes_to_public_key(value)) == value
    except Exception:  # noqa: BLE001 - anything that does not parse is refused
        return False


def _masked_vectors(
    blobs: list[bytes], allowlist: EgressAllowlist, where: str
) -> list[str]:
    """SecAgg+'s masked vectors: the weight factor (1,), then the packed adapter."""
    shapes = [(1,), (allowlist.packed_size,)]
    labels = ["the weight factor", "the packed adapter"]
    problems = []
    if len(blobs) != len(shapes):
        problems.append(
            f"{where}: {len(blobs)} masked array(s), expected {len(shapes)} "
            "(the weight factor, then the packed adapter)"
        )
    for i, (blob, shape, label) in enumerate(zip(blobs, shapes, labels, strict=False)):
        at = f"{where} masked array {i} ({label})"
        decoded = _decode(blob)
        if decoded is None:
            problems.append(f"{at}: the bytes are not a pickle-free .npy array")
            continue
        value, exact = decoded
        if not np.issubdtype(value.dtype, np.integer):
            problems.append(
                f"{at}: dtype {_dtype_text(value.dtype)}, expected integers"
            )
        elif value.size and value.min() < 0:
            problems.append(f"{at}: negative entries (masked values are mod-reduced)")
        if value.shape != shape:
            problems.append(f"{at}: shape {value.shape}, expected {shape}")
        if not exact:
            problems.append(f"{at}: the bytes hold more than the array's .npy encoding")
    return problems


# --- the checks ---------------------------------------------------------------------


def secagg_stage_of(configs: ConfigRecord) -> str | None:
    """The SecAgg+ stage whose reply has exactly these config keys, if any."""
    keys = set(configs.keys())
    return next(
        (stage for stage, spec in _SECAGG_REPLY_KEYS.items() if keys == set(spec)), None
    )


def check_secagg_reply(
    content: RecordDict, allowlist: EgressAllowlist | None, stage: str
) -> None:
    """Check what Flower's SecAgg+ mod sends back at ``stage``.

    ``allowlist`` is needed at the ``collect_masked_vectors`` stage only.

    Raises
    ------
    EgressViolation
        Listing every problem found; the text names places, never values.
    """
    what = "SecAgg+ reply"
    if stage not in _SECAGG_REPLY_KEYS:
        _refuse(what, [f"unknown SecAgg+ stage {_unlisted(stage)}"])
    what = f"SecAgg+ {stage} reply"
    collect = stage == Stage.COLLECT_MASKED_VECTORS
    if collect and allowlist is None:
        raise ValueError("checking masked vectors needs the egress allowlist")
    layout: dict[str, type] = {SECAGG_CONFIGS: ConfigRecord}
    problems = _layout(content, {**layout, **_FITRES_LAYOUT} if collect else layout)
    configs = content.get(SECAGG_CONFIGS)
    where = f"record {SECAGG_CONFIGS!r}"
    if isinstance(configs, ConfigRecord):
        spec = _SECAGG_REPLY_KEYS[stage]
        extra = [_unlisted(key) for key in configs.keys() if key not in spec]
        if extra:
            problems.append(f"{where}: unexpected key(s) {', '.join(extra)}")
        problems += [f"{where}: {key!r} missing" for key in spec if key not in configs]
        for key, expected in spec.items():
            value = configs.get(key)
            if key in configs and not _typed(value, expected):
                problems.append(f"{where} {key!r}: is not {expected}")
            elif stage == Stage.SETUP and key in configs and not _public_key(value):
                problems.append(f"{where} {key!r}: not a canonical PEM public key")
        pairs = {Stage.SHARE_KEYS: (Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST)}
        pairs[Stage.UNMASK] = (Key.NODE_ID_LIST, Key.SHARE_LIST)
        if stage in pairs:
            ids, blobs = (configs.get(key) for key in pairs[stage])
            if (
                isinstance(ids, list)
                and isinstance(blobs, list)
                and len(ids) != len(blobs)
            ):
                problems.append(f"{where}: {len(ids)} node ids but {len(blobs)} blobs")
        blobs = configs.get(Key.MASKED_PARAMETERS)
        if collect and allowlist is not None and _typed(blobs, "list[bytes]"):
            problems += _masked_vectors(
                cast(list[bytes], blobs),
                allowlist,
                f"{where} {Key.MASKED_PARAMETERS!r}",
            )
    if collect:
        problems += _fitres_records(content, allowlist, masked=True)
    _raise_if(what, problems)


# --- Flower mods --------------------------------------------------------------------
