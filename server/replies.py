"""Sites' replies, checked and turned into typed reports.

A reply that carries an error, lacks a record or holds the wrong kind of payload
becomes a :class:`~wardround.server.records.SiteFailure`; a sound one a
:class:`~wardround.server.records.SiteTrainReport` or ``SiteEvalReport``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from ..common import wire
from ..common.adapter import vector_l2_norm
from ..common.config.enums import TransportDtype
from ..common.errors import error_kind
from ..common.packing import AdapterLayout
from ..common.release import version_from_metrics
from ..common.transport import WIRE_DTYPES, decode
from ..flower_compat.payloads import array_view, release_arrays
from ..flower_compat.replies import addressee_of, error_reason, site_went_away
from .records import PrivacySpend, SiteEvalReport, SiteFailure, SiteTrainReport

log = logging.getLogger(__name__)

NameOf = Callable[[int, int], str]
"""``(node id, site index) -> site name``; index -1 when unknown."""


CLIP_SLACK = 0.01
"""A delta may exceed ``federation.delta-clip-norm`` by this share: float32 sums and
bfloat16 rounding (at most 2^-8 per value) move an honest site's norm a little."""


def check_train_reply(
    msg: Message,
    payload: AdapterLayout,
    transport: TransportDtype = TransportDtype.FLOAT32,
    clip_norm: float = 0.0,
    decoded: dict[int, np.ndarray] | None = None,
) -> str | None:
    """Why a train reply's payload is not a delta of ``payload``'s layout, or None.

    ``decoded``, where given, receives a sound reply's float32 delta under
    ``id(msg)``: the caller averages it without decoding the bytes again.

    The coordinator adds the reply to the global weights: a site that sent its
    trained *weights* (under the global adapter's key, or tagged as such) would
    double the adapter. A reply in another wire version, or packed for another
    layout, cannot be read. A delta with NaN or infinity, or longer than the clip
    norm every site applies (``clip_norm`` > 0), or a count that is not one, would
    spoil the round for every site: the reply is left out, whoever sent it. Only
    the decoded bytes are trusted, never the shape and dtype a reply declares.
    """
    content = msg.content
    delta = content.get(wire.ADAPTER_DELTA)
    if not isinstance(delta, ArrayRecord):
        return f"reply's {wire.ADAPTER_DELTA!r} record is not an ArrayRecord"
    metrics = content.get(wire.METRICS)
    problem = _metrics_problem(metrics if isinstance(metrics, MetricRecord) else None)
    if problem is not None:
        return problem
    values = _packed_delta(delta, payload, transport, clip_norm)
    if isinstance(values, str):
        return values
    if wire.GLOBAL_ADAPTER in content:
        return (
            f"reply carries weights ({wire.GLOBAL_ADAPTER!r}); the round needs a delta"
        )
    config = content.get(wire.CONFIG)
    kind = config.get(wire.PAYLOAD_KIND) if isinstance(config, ConfigRecord) else None
    if kind is not None and kind != wire.PayloadKind.DELTA.value:
        return (
            f"reply's payload kind is {str(kind)[:20]!r}; the round needs "
            f"{wire.PayloadKind.DELTA.value!r}"
        )
    if decoded is not None:
        decoded[id(msg)] = values
    return None


MAX_EXAMPLES = 10**9
"""More examples than any site holds: a larger count would make one site the mean."""


def _metrics_problem(metrics: MetricRecord | None) -> str | None:
    """The wire version, the example count and the site index a mean relies on."""
    if metrics is None:
        return f"reply's {wire.METRICS!r} record is not a MetricRecord"
    version = metrics.get(wire.WIRE_VERSION_KEY)
    if version != wire.WIRE_VERSION:
        said = (
            "no wire version (1)"
            if version is None
            else f"wire version {str(version)[:8]!r}"
        )
        return (
            f"the site speaks {said}; this coordinator reads wire version "
            f"{wire.WIRE_VERSION} (upgrade the older side)"
        )
    count = metrics.get(wire.NUM_EXAMPLES)
    if type(count) is not int or not 1 <= count <= MAX_EXAMPLES:
        return f"reply's {wire.NUM_EXAMPLES!r} is not a whole number from 1 to 10^9"
    index = metrics.get(wire.SITE_INDEX, -1)
    if type(index) is not int:
        return f"reply's {wire.SITE_INDEX!r} is not a whole number"
    return None


def _packed_delta(
    delta: ArrayRecord,
    payload: AdapterLayout,
    transport: TransportDtype,
    clip_norm: float,
) -> np.ndarray | str:
    """The one packed array as float32 values, or why it is not usable.

    It must decode, have the layout's length and the run's dtype, be finite and
    stay within the clip norm.
    """
    if list(delta.keys()) != [wire.PACKED_ADAPTER]:
        return f"reply's delta holds {len(delta)} array(s), not the one packed adapter"
    try:
        packed = array_view(delta[wire.PACKED_ADAPTER])  # no pickle, no copy
    except Exception:  # noqa: BLE001 - any undecodable bytes are the site's failure
        return "reply's packed delta does not decode as a pickle-free .npy array"
    if packed.shape != (payload.size,):
        return (
            f"reply's packed delta has shape {packed.shape}; the payload's layout "
            f"needs ({payload.size},)"
        )
    if packed.dtype != WIRE_DTYPES[transport]:
        return (
            f"reply's packed delta is {_dtype_name(packed.dtype)}; transport-dtype "
            f"'{transport.value}' travels as {WIRE_DTYPES[transport].name}"
        )
    values = decode(packed, transport)
    norm = vector_l2_norm(values)
    if not math.isfinite(norm):
        return "reply's delta holds NaN or infinity"
    if clip_norm > 0 and norm > clip_norm * (1 + CLIP_SLACK):
        return (
            f"reply's delta has L2 norm {norm:.4g}, above "
            f"federation.delta-clip-norm = {clip_norm:g} that every site applies"
        )
    return values


def _dtype_name(dtype: np.dtype) -> str:
    return "a structured dtype" if dtype.fields else dtype.name


def split_replies(
    replies: Iterable[Message],
    phase: str,
    need: tuple[str, ...],
    *,
    sent: Iterable[Message] = (),
    timeout_s: float = 0.0,
    check: Callable[[Message], str | None] | None = None,
) -> tuple[list[Message], list[SiteFailure]]:
    """The sound replies, and a failure for every other site that was sent to.

    ``sent`` are the messages the grid pushed (it gave each its message id).
    ``check`` says why an otherwise complete reply is unusable (None: usable).
    """
    ok, failed = [], []
    replies, sent = list(replies), list(sent)  # each is read twice
    node_of = addressee_of(sent)
    replied = {node_of(m) for m in replies}
    # A site that is connected but silent (hung, killed, cut off) sends no error:
    # name it here, so the round's record and the audit say who was missing.
    sent_to = {int(m.metadata.dst_node_id) for m in sent}
    for node in sorted(sent_to - replied):
        failed.append(
            SiteFailure(
                node,
                phase,
                f"no reply within federation.round-timeout-s ({timeout_s:g} s)",
                went_away=True,
            )
        )
    for msg in replies:
        node = node_of(msg)
        problem = _problem(msg, need, check)
        if problem is None:
            ok.append(msg)
        else:
            reason, kind = problem
            failed.append(
                SiteFailure(node, phase, reason, kind, went_away=site_went_away(msg))
            )
    for failure in failed:
        log.warning(
            "site %s failed in %s: %s",
            failure.node_id,
            phase,
            failure.reason.splitlines()[0] if failure.reason else "",
        )
    return ok, failed


def _problem(
    msg: Message,
    need: tuple[str, ...],
    check: Callable[[Message], str | None] | None,
) -> tuple[str, str | None] | None:
    """(reason, the site's error kind or None) for an unusable reply; None if sound."""
    if msg.has_error():
        reason = error_reason(msg)[:500]
        return reason, error_kind(reason)
    missing = [k for k in need if k not in msg.content]
    if missing:
        return f"reply lacks {missing}", None
    try:
        problem = check(msg) if check is not None else None
    except Exception as error:  # noqa: BLE001 - a reply must never stop the round
        problem = f"reply could not be read ({type(error).__name__})"
    return None if problem is None else (problem, None)


def release_round_arrays(sent: list[Message], replies: list[Message]) -> None:
    """Free the arrays of an exchange's replies, and of its messages once all replied.

    Call it once the replies have been read (:mod:`wardround.flower_compat.payloads`
    says why it matters). The messages sent share one global adapter, which an
    in-process grid may still hand to a site that has not answered: those keep it.
    """
    release_arrays(replies)
    answered = {m.metadata.reply_to_message_id for m in replies}
    if all(m.metadata.message_id in answered for m in sent):
        release_arrays(sent)


def reasons(failures: list[SiteFailure], name_of: NameOf | None = None) -> str:
    """One line naming each failed site and the first line of its reason.

    With ``name_of``, a site by its enrolled name (node ids change when a
    coordinator restarts), its node id after it.
    """

    def who(node_id: int) -> str:
        try:
            name = name_of(node_id, -1) if name_of is not None else ""
        except Exception:  # noqa: BLE001 - a broken roster must not hide the failure
            name = ""
        if name and name not in (str(node_id), f"node-{node_id}"):
            return f"{name} (node {node_id})"
        return f"node {node_id}"

    return "; ".join(
        f"{who(f.node_id)}: {f.reason.splitlines()[0] if f.reason else '?'}"
        for f in failures
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _privacy(metrics: dict[str, Any]) -> PrivacySpend | None:
    if wire.DP_EPSILON_RUN not in metrics:
        return None
    return PrivacySpend(
        epsilon_run=float(metrics[wire.DP_EPSILON_RUN]),
        epsilon_run_prv=float(metrics.get(wire.DP_EPSILON_RUN_PRV, -1.0)),
        epsilon_total=float(metrics[wire.DP_EPSILON_TOTAL]),
        delta=float(metrics[wire.DP_DELTA]),
        noise_multiplier=float(metrics[wire.DP_NOISE_MULTIPLIER]),
        sample_rate=float(metrics[wire.DP_SAMPLE_RATE]),
        steps=int(metrics[wire.DP_STEPS]),
        max_grad_norm=float(metrics[wire.DP_MAX_GRAD_NORM]),
        epsilon_budget=_optional_float(metrics.get(wire.DP_EPSILON_BUDGET)),
    )


def train_report(
    node: int, metrics: dict[str, Any], bytes_sent: int, name_of: NameOf
) -> SiteTrainReport:
    """A site's train reply metrics as its report."""
    return SiteTrainReport(
        node_id=node,
        site=name_of(node, int(metrics.get(wire.SITE_INDEX, -1))),
        num_examples=int(metrics[wire.NUM_EXAMPLES]),
        # A site's answer policy may keep these home (always under SecAgg+).
        loss=float(metrics.get(wire.TRAIN_LOSS, float("nan"))),
        steps=int(metrics.get(wire.TRAIN_STEPS, 0)),
        seconds=float(metrics.get(wire.TRAIN_SECONDS, float("nan"))),
        delta_l2=float(metrics.get(wire.DELTA_L2, float("nan"))),
        bytes_sent=bytes_sent,
        delta_clipped=bool(metrics.get(wire.DELTA_CLIPPED, 0)),
        privacy=_privacy(metrics),
        software_version=version_from_metrics(metrics),
    )


def eval_report(
    node: int, metrics: Any, name_of: NameOf, labels: Iterable[str]
) -> SiteEvalReport:
    """A site's evaluate reply metrics as its report."""
    return SiteEvalReport(
        node_id=node,
        site=name_of(node, int(metrics.get(wire.SITE_INDEX, -1))),
        num_examples=int(metrics[wire.NUM_EXAMPLES]),
        loss=float(metrics.get(wire.EVAL_LOSS, float("nan"))),
        auroc_macro=float(metrics.get(wire.AUROC_MACRO, float("nan"))),
        auroc_per_label={
            label: float(metrics.get(wire.AUROC_PREFIX + label, float("nan")))
            for label in labels
        },
        metrics={
            name: float(metrics[name])
            for name in wire.GENERATIVE_METRICS
            if name in metrics
        },
        software_version=version_from_metrics(metrics),
        seconds=(
            float(metrics[wire.EVAL_SECONDS]) if wire.EVAL_SECONDS in metrics else None
        ),
    )
