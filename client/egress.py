"""The egress guard: nothing but the declared adapter tensors and numbers leaves a site.

Every outgoing reply is checked against an :class:`EgressAllowlist` built from the
adapter (tensor names and shapes, which fix the packed vector's length; float32) and
the numeric metrics schema of :mod:`wardround.common.wire`. The adapter leaves as one
packed array (wire version 2, :mod:`wardround.common.packing`): exactly one array,
under its one name, of exactly the payload's length, float32, finite, and nothing in
its bytes beyond the array. A reply that holds anything else is refused: it is not
sent, the coordinator gets an error reply that says what is wrong and where (never the
offending value), and the violation is logged locally.

Three reply shapes are checked:

- Message-API replies (:func:`check_reply`): ``delta`` + ``metrics`` for train,
  ``metrics`` alone for evaluate;
- the legacy FitRes record dict a train handler produces under secure aggregation,
  before Flower's SecAgg+ mod quantizes and masks it (:func:`check_legacy_fitres`);
- what Flower's SecAgg+ mod sends back at each of its stages
  (:func:`~wardround.client.egress_secagg.check_secagg_reply`).

Names outside the allowlist are never echoed, since a record key or a metric name can
be built from data: they appear as their length and a short SHA-256.

Mod order, outermost first (:func:`guarded_mods`)::

    [error_sanitizing_mod, guard, secaggplus_mod, guard(raise_violations=True)]

The outer guard sees what SecAgg+ sends; the inner one sees the float delta before it
is quantized and masked (NaN and shapes can only be checked there). The inner one
raises, since Flower's SecAgg+ mod fails on an error reply, and the sanitizing mod
turns that into an error reply that names the violation.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType

from ..common import wire
from ..common.config.enums import TransportDtype
from ..common.errors import EgressViolation
from ..common.npy import npy_header, read_npy
from ..common.packing import AdapterLayout
from ..common.transport import WIRE_DTYPES, decode
from ..flower_compat.constants import SType
from ..flower_compat.secagg_protocol import RECORD_KEY_CONFIGS

log = logging.getLogger("wardround.egress")

WIRE_METRIC_NAMES: frozenset[str] = frozenset(wire.METRIC_NAMES)
"""Every fixed metric name of the wire contract."""

# The legacy FitRes layout (flwr/compat/common/recorddict_compat.py).
FITRES_PARAMETERS = "fitres.parameters"
FITRES_METRICS = "fitres.metrics"
FITRES_NUM_EXAMPLES = "fitres.num_examples"
FITRES_STATUS = "fitres.status"
_FITRES_LAYOUT: dict[str, type] = {
    FITRES_PARAMETERS: ArrayRecord,
    FITRES_METRICS: ConfigRecord,
    FITRES_NUM_EXAMPLES: MetricRecord,
    FITRES_STATUS: ConfigRecord,
}
_STATUS_OK = 0  # flwr.compat.common.typing.Code.OK
_STATUS_MESSAGES = ("Success", "")  # what NumPyClient writes, or nothing

SECAGG_CONFIGS = RECORD_KEY_CONFIGS
_HINT = (
    "Nothing was sent. Only the declared adapter tensors (packed into one finite "
    "array of the run's transport dtype) and numeric metrics named in the wire "
    "schema may leave the site."
)


@dataclass(frozen=True)
class EgressAllowlist:
    """What may leave the site.

    Attributes
    ----------
    tensors : tuple of (str, tuple of int)
        The adapter tensors as (name, shape), in payload order: the packed layout.
    metric_names : frozenset of str
        The fixed metric names.
    metric_prefixes : tuple of str
        Prefixes that, followed by one of ``labels``, name a metric (``auroc.<label>``).
    labels : frozenset of str
        The run's label names (from the run config, never from data).
    transport : TransportDtype
        How the packed delta travels in a plain round (``federation.transport-dtype``).
    """

    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    metric_names: frozenset[str]
    metric_prefixes: tuple[str, ...] = (wire.AUROC_PREFIX,)
    labels: frozenset[str] = frozenset()
    transport: TransportDtype = TransportDtype.FLOAT32

    def __post_init__(self) -> None:
        names = [name for name, _ in self.tensors]
        if not names:
            raise ValueError("an egress allowlist needs at least one adapter tensor")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"adapter tensor names repeat in the allowlist: {repeated}"
            )
        for name, shape in self.tensors:
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(
                    f"adapter tensor {name!r} has an invalid shape {shape}"
                )

    @classmethod
    def for_payload(
        cls,
        payload_shapes: Mapping[str, Sequence[int]],
        labels: Iterable[str],
        *,
        extra_metric_names: Iterable[str] = (),
        transport: TransportDtype = TransportDtype.FLOAT32,
    ) -> EgressAllowlist:
        """The allowlist for a payload (name -> shape, in payload order) and run labels."""
        return cls(
            transport=transport,
            tensors=tuple(
                (str(name), tuple(int(d) for d in shape))
                for name, shape in payload_shapes.items()
            ),
            metric_names=WIRE_METRIC_NAMES | frozenset(extra_metric_names),
            metric_prefixes=(wire.AUROC_PREFIX,),
            labels=frozenset(labels),
        )

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The tensor names in payload order."""
        return tuple(name for name, _ in self.tensors)

    @property
    def layout(self) -> AdapterLayout:
        """The payload's packed layout."""
        return AdapterLayout.of_shapes(dict(self.tensors))

    @property
    def packed_size(self) -> int:
        """The one packed array's length: every payload tensor's values."""
        return self.layout.size

    def allows_metric(self, name: str) -> bool:
        """Whether ``name`` is a fixed metric name or a prefix + a run label."""
        if name in self.metric_names:
            return True
        return any(
            name.startswith(prefix) and name[len(prefix) :] in self.labels
            for prefix in self.metric_prefixes
        )


# --- describing places without values ---------------------------------------------


def _unlisted(name: str) -> str:
    digest = hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:12]
    return f"<unlisted name, {len(name)} chars, sha256 {digest}>"


def _shown(name: str, known: Iterable[str]) -> str:
    return repr(name) if name in set(known) else _unlisted(name)


def _dtype_text(dtype: str | np.dtype) -> str:
    try:
        parsed = np.dtype(dtype)
    except (TypeError, ValueError):
        return "an unreadable dtype"
    return "a structured dtype" if parsed.fields else parsed.name


def _refuse(what: str, problems: Sequence[str]) -> NoReturn:
    text = f"{what} refused ({len(problems)} problem(s)): " + "; ".join(problems)
    log.error("egress refused: %s", text)
    raise EgressViolation(text, hint=_HINT)


def _raise_if(what: str, problems: Sequence[str]) -> None:
    if problems:
        _refuse(what, problems)


# --- packing what leaves -------------------------------------------------------------


def pack_payload(
    payload: Mapping[str, np.ndarray], allowlist: EgressAllowlist
) -> np.ndarray:
    """The payload packed in the allowlist's layout: its tensors, by name and shape.

    The packed array carries no names, so this is where they are checked: a payload
    of the right total length with another tensor in it is refused here.

    Raises
    ------
    EgressViolation
        A tensor not in the allowlist (shown only as length and hash), a declared
        one missing, or a shape other than the declared one.
    """
    expected = dict(allowlist.tensors)
    extra = [name for name in payload if name not in expected]
    missing = [name for name in expected if name not in payload]
    problems = []
    if extra:
        problems.append(
            f"{len(extra)} tensor(s) not in the adapter allowlist: "
            + ", ".join(_unlisted(name) for name in extra)
        )
    if missing:
        problems.append(f"{len(missing)} declared tensor(s) missing: {missing[:5]}")
    for name, value in payload.items():
        shape = tuple(np.shape(value))
        if name in expected and shape != expected[name]:
            problems.append(
                f"tensor {name!r}: shape {shape}, expected {expected[name]}"
            )
    _raise_if("train reply (packing)", problems)
    return allowlist.layout.pack(payload)


# --- checks of the parts ------------------------------------------------------------


def _layout(content: RecordDict, expected: Mapping[str, type]) -> list[str]:
    problems = []
    for key, record in content.items():
        kind = type(record).__name__
        if key not in expected:
            problems.append(
                f"record {_unlisted(key)}: an unexpected {kind} "
                f"(only {sorted(expected)} may be sent)"
            )
        elif not isinstance(record, expected[key]):
            problems.append(
                f"record {key!r}: is a {kind}, expected a {expected[key].__name__}"
            )
    problems += [f"record {key!r}: missing" for key in expected if key not in content]
    return problems


def _decode(data: bytes) -> tuple[np.ndarray, bool] | None:
    """The array in ``data`` (a view) and whether ``data`` is exactly its encoding.

    None when ``data`` is not a pickle-free .npy array. Exactly: the header
    ``np.save`` writes for that array, then its values and nothing after them. The
    values are ``data``'s own bytes, so comparing the header and the length is
    comparing the whole encoding, without a second copy of the adapter. A
    structured dtype is never exact: its padding bytes are nobody's values.
    """
    try:
        value, offset = read_npy(data, trailing=True)
    except Exception:  # noqa: BLE001 - anything that does not decode is refused
        return None
    try:
        header = npy_header(value)
    except Exception:  # noqa: BLE001 - a header numpy would not write is not exact
        return value, False
    exact = (
        value.dtype.fields is None
        and len(data) == offset + value.nbytes
        and data[:offset] == header
    )
    return value, exact


def _float_array(
    array: Array,
    shape: tuple[int, ...],
    where: str,
    *,
    legacy: bool = False,
    transport: TransportDtype = TransportDtype.FLOAT32,
) -> list[str]:
    """Problems of one adapter array: the transport's dtype, the shape, finite."""
    if array.stype != SType.NUMPY:
        return [f"{where}: not serialised as {SType.NUMPY}"]
    decoded = _decode(array.data)
    if decoded is None:
        return [f"{where}: the bytes are not a pickle-free .npy array"]
    value, exact = decoded
    problems = []
    expected = WIRE_DTYPES[transport]
    if value.dtype != expected:
        problems.append(
            f"{where}: dtype {_dtype_text(value.dtype)}, expected {expected.name}"
            + ("" if transport is TransportDtype.FLOAT32 else f" ({transport.value})")
        )
    elif not np.isfinite(decode(value, transport)).all():
        count = int(value.size - np.isfinite(decode(value, transport)).sum())
        problems.append(f"{where}: {count} non-finite value(s) (NaN or inf)")
    if value.shape != shape:
        problems.append(f"{where}: shape {value.shape}, expected {shape}")
    # The legacy Parameters conversion leaves dtype "" and shape () in the metadata.
    declared = (array.dtype, tuple(array.shape))
    if not (legacy and declared == ("", ())) and declared != (
        str(value.dtype),
        value.shape,
    ):
        problems.append(f"{where}: the declared dtype or shape differs from the bytes")
    if not exact:
        problems.append(f"{where}: the bytes hold more than the array's .npy encoding")
    return problems


def _packed_tensor(
    record: ArrayRecord, allowlist: EgressAllowlist, where: str
) -> list[str]:
    """The adapter as one packed array named ``wire.PACKED_ADAPTER``."""
    return _one_array(record, allowlist, where, (wire.PACKED_ADAPTER,), legacy=False)


def _ordered_tensors(
    record: ArrayRecord, allowlist: EgressAllowlist, where: str
) -> list[str]:
    """Legacy Parameters: the packed adapter as the one unnamed array ("0")."""
    return _one_array(record, allowlist, where, ("0",), legacy=True)


def _one_array(
    record: ArrayRecord,
    allowlist: EgressAllowlist,
    where: str,
    names: tuple[str],
    *,
    legacy: bool,
) -> list[str]:
    keys = list(record.keys())
    problems = []
    if keys != list(names):
        shown = ", ".join(_shown(key, names) for key in keys[:5])
        problems.append(
            f"{where}: {len(keys)} array(s) [{shown}]; wire version "
            f"{wire.WIRE_VERSION} sends one, the packed adapter, as {names[0]!r}"
        )
    if names[0] in record:
        problems += _float_array(
            record[names[0]],
            (allowlist.packed_size,),
            f"{where} array {names[0]!r} (the packed adapter)",
            legacy=legacy,
            # SecAgg+ (the legacy FitRes) takes float32 only: the config refuses both
            transport=TransportDtype.FLOAT32 if legacy else allowlist.transport,
        )
    return problems


def _metric_values(
    items: Mapping[str, object], allowlist: EgressAllowlist, where: str
) -> list[str]:
    """Problems of a metrics record: schema names, int or float values, finite."""
    problems = []
    for name, value in items.items():
        if not allowlist.allows_metric(name):
            problems.append(f"{where}: metric {_unlisted(name)} is not in the schema")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(
                f"{where} metric {name!r}: is a {type(value).__name__}, "
                "expected an int or a float"
            )
        elif not math.isfinite(value):
            problems.append(f"{where} metric {name!r}: not finite (NaN or inf)")
    return problems


def _fitres_records(
    content: RecordDict, allowlist: EgressAllowlist | None, *, masked: bool
) -> list[str]:
    """Problems of the FitRes records; ``masked``: SecAgg+ has cleared the arrays."""
    problems = []
    params = content.get(FITRES_PARAMETERS)
    where = f"record {FITRES_PARAMETERS!r}"
    if isinstance(params, ArrayRecord):
        if masked and len(params):
            problems.append(f"{where}: {len(params)} array(s) left after masking")
        elif not masked and allowlist is not None:
            problems += _ordered_tensors(params, allowlist, where)
    metrics = content.get(FITRES_METRICS)
    if isinstance(metrics, ConfigRecord) and allowlist is not None:
        problems += _metric_values(metrics, allowlist, f"record {FITRES_METRICS!r}")
    counts = content.get(FITRES_NUM_EXAMPLES)
    where = f"record {FITRES_NUM_EXAMPLES!r}"
    if isinstance(counts, MetricRecord):
        extra = [key for key in counts.keys() if key != "num_examples"]
        if extra:
            problems.append(f"{where}: {len(extra)} key(s) besides 'num_examples'")
        value = counts.get("num_examples")
        if type(value) is not int or value < 0:
            problems.append(f"{where}: 'num_examples' is not an int >= 0")
    status = content.get(FITRES_STATUS)
    where = f"record {FITRES_STATUS!r}"
    if isinstance(status, ConfigRecord):
        if set(status.keys()) != {"code", "message"}:
            problems.append(f"{where}: keys other than 'code' and 'message'")
        code = status.get("code")
        if type(code) is not int or code != _STATUS_OK:
            problems.append(f"{where}: 'code' is not {_STATUS_OK} (OK)")
        if status.get("message") not in _STATUS_MESSAGES:
            problems.append(f"{where}: 'message' is not one of {_STATUS_MESSAGES}")
    return problems


def check_reply(content: RecordDict, allowlist: EgressAllowlist, *, kind: str) -> None:
    """Check a Message-API reply (``kind``: "train" or "evaluate").

    Raises
    ------
    EgressViolation
        Listing every problem found; the text names places, never values.
    """
    layouts: dict[str, dict[str, type]] = {
        MessageType.TRAIN: {
            wire.ADAPTER_DELTA: ArrayRecord,
            wire.METRICS: MetricRecord,
        },
        MessageType.EVALUATE: {wire.METRICS: MetricRecord},
    }
    if kind not in layouts:
        _refuse("reply", [f"no egress allowlist for message type {_unlisted(kind)}"])
    problems = _layout(content, layouts[kind])
    delta = content.get(wire.ADAPTER_DELTA)
    if kind == MessageType.TRAIN and isinstance(delta, ArrayRecord):
        problems += _packed_tensor(delta, allowlist, f"record {wire.ADAPTER_DELTA!r}")
    metrics = content.get(wire.METRICS)
    if isinstance(metrics, MetricRecord):
        problems += _metric_values(metrics, allowlist, f"record {wire.METRICS!r}")
    _raise_if(f"{kind} reply", problems)


def check_legacy_fitres(content: RecordDict, allowlist: EgressAllowlist) -> None:
    """Check a legacy FitRes record dict (a train reply under secure aggregation).

    Raises
    ------
    EgressViolation
        Listing every problem found; the text names places, never values.
    """
    problems = _layout(content, _FITRES_LAYOUT)
    problems += _fitres_records(content, allowlist, masked=False)
    _raise_if("train reply (legacy FitRes)", problems)
