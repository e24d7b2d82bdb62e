"""The site's Flower ``ClientApp``: train and evaluate the global adapter locally.

What leaves the site: the adapter *delta* (the declared payload tensors, clipped to
the run's L2 bound, packed into one array: float32, or the run's half-precision
transport in a plain round) and numeric metrics keyed by fixed names (see
``common/wire.py``). Under secure aggregation the delta goes to Flower's SecAgg+
mod, which quantizes and masks it. Every reply passes the egress guard; every
exception leaves as a sanitized reason.

Mods, outermost first (``client/egress_mods.site_mods``): error sanitizing → egress
guard → SecAgg+ (SecAgg+ messages only) → inner egress guard.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from .. import __version__
from ..common import wire
from ..common.adapter import (
    adapter_state,
    clip_l2,
    from_record,
    l2_norm,
    load_adapter_state,
    packed_record,
)
from ..common.aggregation import subtract
from ..common.config import RunConfig
from ..common.errors import (
    AnswerRefused,
    ConfigError,
    FederationError,
    ModelMismatchError,
)
from ..common.npy import npy_bytes, npy_view
from ..common.release import version_metrics
from ..flower_compat.legacy import (
    Code,
    FitRes,
    Parameters,
    Status,
)
from ..flower_compat.legacy import recorddict_compat as compat
from ..ops.audit import AUDIT_FILENAME, AuditLog
from .answer_audit import make_answer_audit_mod
from .answers import AnswerKind, coarsen_metrics
from .egress import EgressAllowlist, check_legacy_fitres, check_reply, pack_payload
from .egress_mods import site_mods
from .own_model import evaluate_mixture
from .personal import (
    discard_own_model,
    load_own_model,
    load_personal,
    save_own_model,
    save_personal,
)
from .privacy_policy import DpPlan, plan_site_privacy
from .replay import (
    Release,
    ReleaseStore,
    note_replayed,
    replayable,
    request_digest,
)
from .round_budget import check_round_ahead, commit_round, reserve_round
from .run_identity import approved_run_key, run_identity
from .runtime import (
    SiteRuntime,
    forget_model,
    get_runtime,
    resolve_site_toml,
    samples_folder,
)
from .secure_aggregation import (
    LEGACY_FITINS_ARRAYS,
    check_setup,
    masking_now,
    require_secure_channel,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .trainer import LocalTrainSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Request:
    config: RunConfig
    runtime: SiteRuntime
    round_config: dict[str, Any]
    global_state: OrderedDict[str, np.ndarray]
    simulation: bool
    run: str
    """The site's own identity of the run (never the id the message names)."""
    server_round: int
    secure_aggregation: bool
    """The message came through Flower's SecAgg+ protocol."""


@functools.lru_cache(maxsize=8)
def _parse_run_config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    # Every mod and handler of a message reads the run config: parse it once per run.
    return RunConfig.from_flower(dict(items))


def _load(
    context: Context, run_config: dict[str, Any] | None
) -> tuple[RunConfig, SiteRuntime, bool]:
    import torch

    raw = run_config if run_config is not None else dict(context.run_config)
    config = _parse_run_config(tuple(sorted(raw.items())))
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    node_config = dict(context.node_config)
    site_toml, site_index = resolve_site_toml(node_config, config)
    runtime = get_runtime(site_toml, site_index, config)
    return config, runtime, "partition-id" in node_config


def _parse(
    msg: Message, context: Context, run_config: dict[str, Any] | None
) -> _Request:
    config, runtime, simulation = _load(context, run_config)
    if LEGACY_FITINS_ARRAYS in msg.content:
        # Secure aggregation: Flower's legacy FitIns (unnamed arrays, in key order).
        fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        round_config: dict[str, Any] = dict(fit_ins.config)
        _require_wire(round_config, runtime)
        try:
            arrays = [npy_view(tensor) for tensor in fit_ins.parameters.tensors]
        except ValueError as error:
            raise FederationError(
                f"the coordinator's adapter is not a pickle-free .npy array: {error}",
                hint="The coordinator and this site must run the same wire version.",
            ) from error
        if len(arrays) != 1 or arrays[0].dtype != np.float32:
            raise FederationError(
                f"the coordinator sent {len(arrays)} array(s); wire version "
                f"{wire.WIRE_VERSION} sends the adapter packed into one float32 array",
                hint="The coordinator and this site must run the same wire version.",
            )
        global_state = runtime.adapter_layout.unpack(arrays[0])
    else:
        round_config = (
            dict(cast(ConfigRecord, msg.content[wire.CONFIG]))
            if wire.CONFIG in msg.content
            else {}
        )
        _require_wire(round_config, runtime)
        global_state = from_record(
            cast(ArrayRecord, msg.content[wire.GLOBAL_ADAPTER]), runtime.adapter_layout
        )
    _require_finite(global_state)
    _require_weights(round_config)
    expected = round_config.get(wire.BASE_FINGERPRINT)
    if expected != runtime.built.base_fingerprint:
        raise ModelMismatchError(
            f"the coordinator asks to train against base model {str(expected)[:12]}…, "
            f"this site has {runtime.built.base_fingerprint[:12]}…",
            hint="Use the same model section of the run config and the same weights at every site.",
        )
    run = run_identity(
        config,
        simulation=simulation,
        flower_run=int(context.run_id),
        named_run=str(round_config.get(wire.RUN_ID, "")),
    )
    # personalised sites: this site's own modules over the global adapter
    load_adapter_state(
        runtime.built.model, {**global_state, **load_personal(runtime, run)}
    )
    return _Request(
        config,
        runtime,
        round_config,
        global_state,
        simulation,
        run=run,
        server_round=_server_round(round_config),
        secure_aggregation=LEGACY_FITINS_ARRAYS in msg.content,
    )


def _require_wire(round_config: dict[str, Any], runtime: SiteRuntime) -> None:
    """The message speaks this site's wire version and packs this site's layout."""
    version = round_config.get(wire.WIRE_VERSION_KEY)
    if version != wire.WIRE_VERSION:
        said = "no wire version (1)" if version is None else f"{str(version)[:8]!r}"
        raise FederationError(
            f"the coordinator's message states {said}; this site speaks wire version "
            f"{wire.WIRE_VERSION}",
            hint="The coordinator and every site must run wardround releases that "
            "speak the same wire version; upgrade the older side.",
        )
    layout = round_config.get(wire.ADAPTER_LAYOUT)
    if layout != runtime.adapter_layout.digest:
        raise ModelMismatchError(
            f"the coordinator packs the adapter in layout {str(layout)[:16]!r}, this "
            f"site's model lays it out as {runtime.adapter_layout.digest!r}",
            hint="Use the same model section of the run config at every site.",
        )


def _require_weights(round_config: dict[str, Any]) -> None:
    """The global adapter must arrive as weights: the site trains from it.

    A message that says it carries something else (a delta) is refused; one that
    says nothing carries weights under Flower's default key, as Flower's own do.
    """
    kind = round_config.get(wire.PAYLOAD_KIND, wire.PayloadKind.WEIGHTS.value)
    if kind != wire.PayloadKind.WEIGHTS.value:
        raise FederationError(
            f"the coordinator sent a {str(kind)[:20]!r} payload as the global "
            f"adapter; a site trains from {wire.PayloadKind.WEIGHTS.value!r}",
            hint="The coordinator and this site must run the same wardround release.",
        )


def _server_round(round_config: dict[str, Any]) -> int:
    value = wire.round_number(round_config.get(wire.SERVER_ROUND, 0))
    if value is None:
        raise FederationError(
            "the coordinator's message has no whole-number server round",
            hint="The coordinator must run wardround's ServerApp.",
        )
    return value


def _require_finite(state: OrderedDict[str, np.ndarray]) -> None:
    """Refuse a global adapter holding NaN or infinity, before any work or budget."""
    bad = [name for name, array in state.items() if not np.isfinite(array).all()]
    if bad:
        raise FederationError(
            f"the coordinator sent an adapter with non-finite values in "
            f"{len(bad)} tensor(s) (first: {bad[0]}); this site does not train or "
            "evaluate on it",
            hint="The coordinator's global adapter diverged or was tampered with; "
            "nothing was spent here.",
        )


def _round_seed(request: _Request) -> int:
    """The seed of a round's local training (batches, dropout; not DP noise).

    A deployed site mixes in the approved run: another approved run asking the
    same round of the same adapter must not get the same bits, which, masked
    without DP, two sums could tell apart. A simulation keeps the seed of its
    settings alone (its results are reproduced from them).
    """
    config, runtime = request.config, request.runtime
    text = f"{config.federation.seed}/{runtime.site.site.name}/{request.server_round}"
    if not request.simulation:
        text += f"/{request.run}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _dp_plan(request: _Request) -> DpPlan | None:
    return plan_site_privacy(
        request.config,
        request.runtime.site.privacy,
        request.runtime.data.num_privacy_units,
        simulation=request.simulation,
    )


def _releases(request: _Request) -> ReleaseStore:
    return ReleaseStore(request.runtime.site.ledger_path)


def _digest(request: _Request, kind: AnswerKind) -> str:
    return request_digest(
        kind,
        request.run,
        request.server_round,
        policy=request.runtime.site.answers.model_dump_json(),
        layout=request.runtime.adapter_layout,
        global_state=request.global_state,
    )


def _keep(
    request: _Request,
    kind: AnswerKind,
    digest: str,
    metrics: dict[str, Any],
    packed: np.ndarray | None = None,
) -> None:
    """Keep the answer for a repeat; a failure only costs that repeat its saving."""
    try:
        _releases(request).keep(
            kind, request.run, request.server_round, digest, metrics, packed
        )
    except Exception as error:  # noqa: BLE001 - the answer is paid for: it is sent
        log.warning(
            "could not keep round %d's %s answer for a repeat (%s); it is sent, "
            "and a repeat would be answered anew",
            request.server_round,
            kind.value,
            error,
        )


def _replay(request: _Request, kind: AnswerKind, digest: str | None) -> Release | None:
    """The answer this site already sent to exactly this question, if it kept it."""
    if digest is None:
        return None
    size = request.runtime.allowlist.layout.size if kind is AnswerKind.TRAIN else 0
    store = _releases(request)
    release = store.find(kind, request.run, digest, payload_size=size)
    if release is not None:
        store.claim_replay(kind, request.run, digest)
        note_replayed(request.server_round)
        log.info(
            "round %d: the coordinator asks a %s question this site has answered "
            "(a resumed round); the same answer is sent again: nothing trained, "
            "no epsilon spent, not counted",
            request.server_round,
            kind.value,
        )
    return release


def require_weight_answerable(runtime: SiteRuntime) -> None:
    """Refuse to answer when the site's policy keeps its example count home.

    Every answer carries it (rounded up to ``count-granularity``): the coordinator
    weighs the update and the metrics by it, and under SecAgg+ it is the masked
    weight.
    """
    if wire.NUM_EXAMPLES not in runtime.site.answers.metrics:
        raise AnswerRefused(
            f"this site's [answers] metrics leave out {wire.NUM_EXAMPLES!r}, which "
            "every answer carries (the weight of its update or metrics, rounded up "
            "to count-granularity); the site does not answer",
            hint=f"Add {wire.NUM_EXAMPLES!r} to [answers] metrics in site.toml, and "
            "raise count-granularity to send it coarser.",
        )


def require_spares_allowed(
    runtime: SiteRuntime, config: RunConfig, *, simulation: bool
) -> None:
    """Refuse a run with more spare answers than the site allows.

    Not in a simulation, where the answer allowance does not apply either.
    """
    spares = config.federation.repeatable_rounds
    allowed = runtime.site.answers.max_repeatable_rounds
    if simulation or spares <= allowed:
        return
    raise AnswerRefused(
        f"the run has federation.repeatable-rounds = {spares}; this site answers at "
        f"most {allowed} spare round(s) per run ([answers] max-repeatable-rounds)",
        hint="Launch the run with fewer repeatable-rounds, or have the site raise "
        "[answers] max-repeatable-rounds in its site.toml.",
    )


def _train(
    request: _Request,
) -> tuple[np.ndarray, dict[str, Any], _OwnRound | None]:
    """One round of local training: the packed, clipped delta and the metrics.

    And, with ``federation.own-model-weight``, what the site's own model needs of
    the round, for once the answer has passed the egress guard.
    """
    from .trainer import LocalTrainSpec, train_local

    config, runtime = request.config, request.runtime
    require_spares_allowed(runtime, config, simulation=request.simulation)
    plan = _dp_plan(request)
    require_weight_answerable(runtime)
    masked = masking_now()
    digest = (
        _digest(request, AnswerKind.TRAIN)
        if replayable(masked=masked, simulation=request.simulation)
        else None
    )
    release = _replay(request, AnswerKind.TRAIN, digest)
    if release is not None and release.packed is not None:
        return release.packed, dict(release.metrics), None
    _admit_answer(request, AnswerKind.TRAIN, once_per_round=masked and plan is None)
    reservation = (
        None
        if plan is None
        else reserve_round(runtime, plan, request.run, request.server_round)
    )
    spec = LocalTrainSpec.from_config(
        config,
        seed=_round_seed(request),
        patients=runtime.data.num_privacy_units,
        # The approved config's, never the message's (0 unless FedProx, by config).
        proximal_mu=config.federation.proximal_mu,
    )
    try:
        outcome = train_local(
            runtime.built.model,
            runtime.data.train,
            spec,
            plan.training if plan is not None else None,
            objective=runtime.objective,
        )
    except BaseException:
        forget_model(runtime)  # it may keep Opacus's hooks: the next message rebuilds
        raise
    trained = adapter_state(runtime.built.model)
    own_round = (
        # the adapter this round trained from: the global one, with the site's modules
        _OwnRound(
            spec,
            {**request.global_state, **load_personal(runtime, request.run)},
            trained,
        )
        if config.federation.own_model_weight
        else None
    )
    save_personal(runtime, request.run, trained)
    full_delta = subtract(trained, request.global_state)
    payload = OrderedDict((k, full_delta[k]) for k in runtime.payload_keys)
    raw_l2 = l2_norm(payload)
    payload, clipped = clip_l2(payload, config.federation.delta_clip_norm)
    if clipped:
        _log_clipping(request.server_round, raw_l2, config, private=plan is not None)
    metrics: dict[str, Any] = {
        wire.NUM_EXAMPLES: outcome.num_examples,
        wire.SITE_INDEX: runtime.site_index,
        wire.TRAIN_LOSS: outcome.mean_loss,
        wire.TRAIN_STEPS: outcome.steps,
        wire.TRAIN_SECONDS: outcome.seconds,
        wire.DELTA_L2: raw_l2,
        wire.DELTA_CLIPPED: int(clipped),
        wire.WIRE_VERSION_KEY: wire.WIRE_VERSION,
        **version_metrics(__version__),
    }
    if plan is not None and reservation is not None:
        metrics.update(
            commit_round(runtime, plan, request.run, reservation, outcome.steps)
        )
    metrics = coarsen_metrics(
        metrics,
        runtime.site.answers,
        secure_aggregation=request.secure_aggregation,
        private=plan is not None,
    )
    packed = pack_payload(payload, runtime.allowlist)
    if digest is not None:
        _keep(request, AnswerKind.TRAIN, digest, metrics, packed)
    return packed, metrics, own_round


@dataclass(frozen=True)
class _OwnRound:
    """What a round of training leaves for the site's own model."""

    spec: LocalTrainSpec
    trained_from: dict[str, np.ndarray]
    """The adapter the round trained from: the global one, with the site's modules."""
    trained: OrderedDict[str, np.ndarray]


def _train_own_model(request: _Request, own_round: _OwnRound) -> None:
    """One round of the site's own model: its patients alone, from where it was.

    It starts from the adapter as this site built it from the approved run config,
    so nothing a coordinator sent is in it. When this round trained from exactly
    that adapter without FedProx's term (an honest first round), the round just
    trained is that model's first (the same start, data and seed) and is kept as
    it, not trained twice. It never leaves the site.
    """
    from .trainer import train_local

    runtime = request.runtime
    own = load_own_model(runtime, request.run)
    initial = runtime.built.initial_adapter
    if initial is None:  # a generative family's config refuses the setting
        raise ConfigError(
            "federation.own-model-weight applies to the fusion family only",
            hint="Set federation.own-model-weight = 0.",
        )
    spec = own_round.spec
    if (
        own is None
        and spec.proximal_mu == 0.0
        and _same(own_round.trained_from, initial)
    ):
        if save_own_model(runtime, request.run, own_round.trained):
            log.info(
                "round %d: the site's own model is this round's training (kept at "
                "the site)",
                request.server_round,
            )
        return
    load_adapter_state(runtime.built.model, own if own is not None else initial)
    # No proximal term: FedProx's anchor is the global adapter, not this model.
    outcome = train_local(
        runtime.built.model,
        runtime.data.train,
        replace(spec, proximal_mu=0.0),
        None,
        runtime.objective,
    )
    if save_own_model(runtime, request.run, adapter_state(runtime.built.model)):
        log.info(
            "round %d: the site's own model trained %d step(s) in %.1f s (kept at "
            "the site)",
            request.server_round,
            outcome.steps,
            outcome.seconds,
        )


def _same(state: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> bool:
    return state.keys() == other.keys() and all(
        np.array_equal(state[k], other[k]) for k in state
    )


def _log_clipping(
    server_round: int, norm: float, config: RunConfig, *, private: bool
) -> None:
    """Log that the delta was scaled down (under SecAgg+ the only record of it)."""
    bound = config.federation.delta_clip_norm
    if private:
        # Under DP-SGD the delta is mostly the steps' noise: the bound then limits
        # the noisy step, which is expected (docs/privacy.md, "The delta bound").
        log.info(
            "round %d: the DP-SGD delta's L2 norm %.3g was scaled down to "
            "federation.delta-clip-norm = %g",
            server_round,
            norm,
            bound,
        )
        return
    log.warning(
        "round %d: the adapter delta's L2 norm %.3g was scaled down to "
        "federation.delta-clip-norm = %g; a bound that honest training reaches "
        "slows the federation (ask the coordinator to raise it above this norm)",
        server_round,
        norm,
        bound,
    )


def _admit_answer(
    request: _Request, kind: AnswerKind, *, once_per_round: bool = False
) -> None:
    """Count this answer against the approved run's allowance, or refuse it.

    Not in a simulation: there the researcher runs both sides, and a resumed run
    may repeat rounds. A deployed site trains an approved run at most its
    ``federation.rounds`` plus ``repeatable-rounds`` times, repeats included.
    """
    if request.simulation:
        return
    request.runtime.answers.admit(
        kind,
        request.run,
        request.server_round,
        request.config.federation.rounds,
        repeatable=request.config.federation.repeatable_rounds,
        once_per_round=once_per_round,
    )


def handle_train(
    msg: Message, context: Context, run_config: dict[str, Any] | None = None
) -> Message:
    """Train the received global adapter on local data; reply with the delta."""
    require_secure_channel(msg, _load(context, run_config)[0])
    request = _parse(msg, context, run_config)
    packed, metrics, own_round = _train(request)
    allowlist = request.runtime.allowlist
    if LEGACY_FITINS_ARRAYS in msg.content:
        max_weight = request.round_config.get(wire.SECAGG_MAX_WEIGHT)
        num_examples = int(metrics[wire.NUM_EXAMPLES])
        if max_weight is not None and num_examples > float(max_weight):
            # SecAgg+ would overflow its quantization range: cap this site's weight.
            log.warning(
                "weight capped at %s examples for secure aggregation", max_weight
            )
            num_examples = int(float(max_weight))
        content = compat.fitres_to_recorddict(
            FitRes(
                status=Status(code=Code.OK, message="Success"),
                parameters=Parameters(
                    tensors=[npy_bytes(packed)],
                    tensor_type="numpy.ndarray",
                ),
                num_examples=num_examples,
                metrics=metrics,
            ),
            keep_input=True,
        )
        check_legacy_fitres(content, allowlist)
    else:
        content = RecordDict(
            {
                wire.ADAPTER_DELTA: packed_record(
                    packed, request.config.federation.transport_dtype
                ),
                wire.METRICS: MetricRecord(metrics),
            }
        )
        check_reply(content, allowlist, kind="train")
    if own_round is not None:
        # once the answer passed this site's inner guard: nothing of this model is
        # in it, and a round whose answer that guard refused does not move it
        try:
            _train_own_model(request, own_round)
        except Exception as failed:  # the site's own, optional: the answer goes out
            log.warning(
                "round %d: the site's own model was not trained this round (%s: "
                "%s); it goes on from where it was",
                request.server_round,
                type(failed).__name__,
                failed,
            )
    return Message(content, reply_to=msg)


def handle_evaluate(
    msg: Message, context: Context, run_config: dict[str, Any] | None = None
) -> Message:
    """Evaluate the received global adapter on the local validation split."""
    from .trainer import evaluate

    request = _parse(msg, context, run_config)
    runtime = request.runtime
    if not runtime.site.answers.evaluate:
        raise AnswerRefused(
            "this site answers no evaluate messages ([answers] evaluate = false)",
            hint="The site operator decides; the run can go on without its metrics.",
        )
    require_weight_answerable(runtime)
    require_spares_allowed(runtime, request.config, simulation=request.simulation)
    digest = (
        _digest(request, AnswerKind.EVALUATE)
        if replayable(masked=False, simulation=request.simulation)
        else None
    )
    release = _replay(request, AnswerKind.EVALUATE, digest)
    if release is not None:
        content = RecordDict({wire.METRICS: MetricRecord(dict(release.metrics))})
        check_reply(content, runtime.allowlist, kind="evaluate")
        return Message(content, reply_to=msg)
    _admit_answer(request, AnswerKind.EVALUATE)
    own_model = (
        load_own_model(runtime, request.run)
        if request.config.federation.own_model_weight
        else None
    )
    if own_model is not None:
        outcome, mixed = evaluate_mixture(
            runtime.built.model,
            own_model,
            runtime.data.validation,
            request.config.train.eval_batch_size,
            runtime.objective,
            request.config.federation.own_model_weight,
        )
        if not mixed:
            discard_own_model(runtime, request.run)
            log.warning(
                "round %d: the site's own model gives NaN or infinite outputs: this "
                "evaluation is the global model's alone, and the own model starts "
                "again at the next round of training",
                request.server_round,
            )
    else:
        outcome = evaluate(
            runtime.built.model,
            runtime.data.validation,
            request.config.train.eval_batch_size,
            runtime.objective,
        )
    if outcome.samples:
        write_samples(request, outcome.samples)
    values: dict[str, float | int] = {
        wire.NUM_EXAMPLES: outcome.num_examples,
        wire.TRAIN_EXAMPLES: len(runtime.data.train),
        wire.SITE_INDEX: runtime.site_index,
        wire.EVAL_LOSS: outcome.loss,
        wire.AUROC_MACRO: outcome.auroc_macro,
        wire.EVAL_SECONDS: outcome.seconds,
        wire.WIRE_VERSION_KEY: wire.WIRE_VERSION,
        **version_metrics(__version__),
    }
    for label, value in zip(
        request.config.task.labels, outcome.auroc_per_label, strict=False
    ):
        values[wire.AUROC_PREFIX + label] = float(value)
    values.update(outcome.metrics)
    # Undefined numbers (one class only, no validation data) are left out, not sent.
    values = {k: v for k, v in values.items() if np.isfinite(v)}
    values = coarsen_metrics(values, runtime.site.answers, secure_aggregation=False)
    if digest is not None:
        _keep(request, AnswerKind.EVALUATE, digest, dict(values))
    content = RecordDict({wire.METRICS: MetricRecord(dict(values))})
    check_reply(content, runtime.allowlist, kind="evaluate")
    return Message(content, reply_to=msg)


def write_samples(request: _Request, samples: list[dict[str, Any]]) -> Path:
    """Keep generated texts at the site: ``<cache>/generations/<run>/round-NNN.jsonl``.

    They derive from patient data, so they never go on the wire; a simulation,
    whose sites are all local, copies them into its run directory (its folder is
    the run id it names). A deployed site files them under the run it approved,
    and never over an earlier file: the coordinator chooses the run id and round
    it names, and could otherwise overwrite what the site kept.
    """
    text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    name = f"round-{request.server_round:03d}"
    if request.simulation:
        run_id = str(request.round_config.get(wire.RUN_ID, "unnamed-run"))
        folder = samples_folder(request.runtime.site.cache_path, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.jsonl"
        path.write_text(text, encoding="utf-8")
        return path
    folder = samples_folder(request.runtime.site.cache_path, request.run)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for copy in itertools.count(1):
        path = folder / (f"{name}.jsonl" if copy == 1 else f"{name}-{copy}.jsonl")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path
    raise AssertionError("unreachable")  # itertools.count never ends


def precheck_secure_round(
    msg: Message, context: Context, run_config: dict[str, Any] | None = None
) -> None:
    """Before joining SecAgg+: refuse now if this site would refuse to train.

    A site that leaves at setup costs the protocol nothing; one that leaves after
    sharing keys has to be reconstructed.
    """
    config, runtime, simulation = _load(context, run_config)
    check_setup(msg, config)
    require_weight_answerable(runtime)
    require_spares_allowed(runtime, config, simulation=simulation)
    plan = plan_site_privacy(
        config,
        runtime.site.privacy,
        runtime.data.num_privacy_units,
        simulation=simulation,
    )
    if plan is not None:
        run = run_identity(
            config, simulation=simulation, flower_run=int(context.run_id), named_run=""
        )
        check_round_ahead(runtime, plan, run)


def build_client_app(run_config: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` overrides the context's (in-process simulation)."""

    def allowlist_for(msg: Message, context: Context) -> EgressAllowlist:
        return _load(context, run_config)[1].allowlist

    def precheck(msg: Message, context: Context) -> None:
        precheck_secure_round(msg, context, run_config)

    def violations_log(context: Context) -> Path | None:
        try:
            return (
                _load(context, run_config)[1].site.cache_path
                / "egress-violations.jsonl"
            )
        except Exception:  # the violation is still logged; the file is a convenience
            return None

    def audit_for(context: Context) -> AuditLog | None:
        try:
            site = _load(context, run_config)[1].site
        except Exception:  # noqa: BLE001 - a site that cannot load answers nothing
            return None
        return AuditLog(
            site.state_path / AUDIT_FILENAME, actor=f"site:{site.site.name}"
        )

    def ledger_run_for(context: Context) -> str | None:
        try:
            config, _, simulation = _load(context, run_config)
        except Exception:  # noqa: BLE001 - a site that cannot load answers nothing
            return None
        # A simulation's key also depends on the run each message names.
        return None if simulation else approved_run_key(config)

    client_app = ClientApp(
        mods=[
            make_answer_audit_mod(audit_for, ledger_run_for),
            *site_mods(allowlist_for, precheck=precheck, violations_log=violations_log),
        ]
    )

    @client_app.train()
    def _train_handler(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, run_config)

    @client_app.evaluate()
    def _evaluate_handler(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, run_config)

    return client_app


app = build_client_app()
