"""Adapter state: get/set the trainable tensors, Flower records, norms and hashes.

The adapter is exactly what ``peft.get_peft_model_state_dict`` returns for the
model: the LoRA factors and the declared trainable modules. Nothing else is ever
put in a record.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from . import wire
from .config.enums import TransportDtype
from .errors import ConfigError, FederationError
from .npy import npy_bytes, npy_view
from .packing import AdapterLayout
from .transport import WIRE_DTYPES, decode, encode

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord


def adapter_state(model: torch.nn.Module) -> OrderedDict[str, np.ndarray]:
    """The adapter's tensors as float32 numpy arrays, in a stable order."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return OrderedDict(
        (k, state[k].detach().to("cpu", dtype=state[k].dtype).float().numpy().copy())
        for k in sorted(state)
    )


def payload_keys(
    state_keys: Iterable[str],
    *,
    frozen_lora_a: bool,
    personal: Iterable[str] = (),
) -> list[str]:
    """The adapter tensors a site sends back.

    All of them, but not LoRA A (FFA-LoRA) nor those of the ``personal`` modules
    (each site keeps its own).

    Sorted: the order of the tensors in the packed array.
    """
    keys = list(state_keys)
    personal = tuple(personal)
    if personal:
        _check_personal(keys, personal)
    return sorted(
        k
        for k in keys
        if not (frozen_lora_a and ".lora_A." in k) and not is_personal(k, personal)
    )


def _check_personal(keys: list[str], personal: tuple[str, ...]) -> None:
    modules = sorted({k.split(".")[2] for k in keys if k.count(".") > 2})
    hint = f"Name modules this model trains: {', '.join(modules)}."
    for module in personal:
        if not any(is_personal(k, (module,)) for k in keys):
            raise ConfigError(
                f"federation.personal names {module!r}, and no tensor this model "
                "trains belongs to it",
                hint=hint,
            )
    if all(is_personal(k, personal) for k in keys):
        raise ConfigError(
            "federation.personal keeps every trained tensor local: nothing is left "
            "to federate",
            hint=hint,
        )


def is_personal(key: str, personal: Iterable[str]) -> bool:
    """Whether adapter tensor ``key`` belongs to one of the ``personal`` modules."""
    return any(f".{module}." in f".{key}" for module in personal)


def load_adapter_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load adapter tensors into the model; every adapter tensor must be given."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise FederationError(
            f"adapter does not fit this model: {len(missing)} tensor(s) missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})",
            hint="The coordinator and this site must use the same run config and model.",
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FederationError(
                f"adapter tensor {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    with warnings.catch_warnings():
        # A read-only view of a message's bytes is only read here (PEFT copies it
        # into the parameters): no copy of its own for torch to write into.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        tensors = {
            k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
            for k, v in state.items()
        }
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise FederationError(
            f"PEFT did not load {len(unexpected)} adapter tensor(s): {unexpected[:2]}"
        )


def to_record(
    state: Mapping[str, np.ndarray],
    transport: TransportDtype = TransportDtype.FLOAT32,
) -> ArrayRecord:
    """The tensors packed into one array of a Flower ArrayRecord.

    Wire version 2: one array per adapter, in :class:`.packing.AdapterLayout` order
    (serialised without pickle); float32, or a plain round's half-precision
    ``transport`` (:mod:`.transport`).
    """
    return packed_record(AdapterLayout.of_state(state).pack(state), transport)


def packed_record(
    packed: np.ndarray, transport: TransportDtype = TransportDtype.FLOAT32
) -> ArrayRecord:
    """An ArrayRecord of one already packed float32 vector, in ``transport``."""
    from flwr.app import Array, ArrayRecord

    values = encode(packed, transport)
    # The fields Array(values) sets, with the .npy bytes written in one copy.
    array = Array(
        dtype=str(values.dtype),
        shape=tuple(int(d) for d in values.shape),
        stype="numpy.ndarray",
        data=npy_bytes(values),
    )
    return ArrayRecord(OrderedDict([(wire.PACKED_ADAPTER, array)]))


def wire_header(state: Mapping[str, np.ndarray]) -> dict[str, str | int]:
    """What a message carrying ``state`` states in its config.

    The wire version and the digest of the adapter's packed layout: the site checks
    both before it reads the adapter.
    """
    return {
        wire.WIRE_VERSION_KEY: wire.WIRE_VERSION,
        wire.ADAPTER_LAYOUT: AdapterLayout.of_state(state).digest,
    }


def from_record(
    record: ArrayRecord,
    layout: AdapterLayout,
    transport: TransportDtype = TransportDtype.FLOAT32,
) -> OrderedDict[str, np.ndarray]:
    """The named float32 tensors of a packed ArrayRecord laid out as ``layout``.

    In float32 transport they are read-only views of the record's bytes: a large
    adapter is held once.

    Raises
    ------
    FederationError
        The record is not one packed array of ``layout``'s size in ``transport``'s
        wire dtype (another wire version, model or transport).
    """
    keys = list(record.keys())
    if keys != [wire.PACKED_ADAPTER]:
        raise FederationError(
            f"the adapter record holds {len(keys)} array(s); wire version "
            f"{wire.WIRE_VERSION} sends one, named {wire.PACKED_ADAPTER!r}",
            hint="The coordinator and every site must run a wardround release that "
            f"speaks wire version {wire.WIRE_VERSION}.",
        )
    try:
        packed = npy_view(record[wire.PACKED_ADAPTER].data)  # read-only, no copy
    except ValueError as error:
        raise FederationError(
            f"the packed adapter is not a pickle-free .npy array: {error}",
            hint="The coordinator and every site must run a wardround release that "
            f"speaks wire version {wire.WIRE_VERSION}.",
        ) from error
    if packed.dtype != WIRE_DTYPES[transport]:
        raise FederationError(
            f"the packed adapter is {packed.dtype.name}; federation.transport-dtype "
            f"'{transport.value}' travels as {WIRE_DTYPES[transport].name}",
            hint="The coordinator and every site must run the same run config.",
        )
    return layout.unpack(decode(packed, transport))


NORM_BLOCK = 1 << 20
"""Values per float64 block when a norm is summed: its temporary stays at 8 MiB
whatever the adapter's size (a 40 M-value delta copied to float64 whole is 320 MB)."""


def _sum_of_squares(values: np.ndarray) -> float:
    flat = np.ravel(values)
    total = 0.0
    # A signalling NaN sets the "invalid" flag when widened: the NaN is the answer
    # (the caller refuses it), not a floating-point warning a site can trigger.
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, flat.size, NORM_BLOCK):
            block = flat[start : start + NORM_BLOCK].astype(np.float64)
            total += float(np.dot(block, block))
    return total


def l2_norm(state: Mapping[str, np.ndarray]) -> float:
    """The global L2 norm over all tensors, summed in float64."""
    return math.sqrt(sum(_sum_of_squares(v) for v in state.values()))


def vector_l2_norm(values: np.ndarray) -> float:
    """The L2 norm of one array, summed in float64 blocks.

    NaN or infinity when any value is one: a float32 value squared stays finite in
    float64, so the norm of finite values is always finite.
    """
    return math.sqrt(_sum_of_squares(values))


def clip_l2(
    state: Mapping[str, np.ndarray], bound: float
) -> tuple[OrderedDict[str, np.ndarray], bool]:
    """Scale ``state`` down so its global L2 norm is at most ``bound`` (0: no bound).

    Returns the (possibly) scaled tensors as float32 and whether scaling happened.
    """
    norm = l2_norm(state)
    if bound <= 0 or norm <= bound:
        return OrderedDict(
            (k, np.asarray(v, np.float32)) for k, v in state.items()
        ), False
    # float32 rounding can push the scaled norm a hair over the bound: aim just below.
    scale = bound / norm * (1.0 - 1e-6)
    return (
        OrderedDict(
            (k, (np.asarray(v, np.float64) * scale).astype(np.float32))
            for k, v in state.items()
        ),
        True,
    )


def adapter_sha256(state: Mapping[str, np.ndarray]) -> str:
    """A content hash of an adapter (names, shapes, float32 bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = np.ascontiguousarray(state[key], dtype=np.float32)
        digest.update(key.encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def num_bytes(state: Mapping[str, np.ndarray]) -> int:
    """Bytes of the tensors as float32."""
    return int(sum(v.size for v in state.values()) * 4)
