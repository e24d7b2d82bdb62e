"""One training phase under Flower's SecAgg+, bridged from the Message API.

SecAgg+ exists only in Flower's legacy workflow API. This module runs exactly one
``SecAggPlusWorkflow`` (its four stages) per round on a ``LegacyContext`` whose
strategy is a thin bridge: it hands the workflow the fit instructions our
Message-API strategy already built, and receives the unmasked *weighted mean* of
the sites' deltas. Everything else (sampling, evaluation, the run directory) stays
on the Message API.

The quantization settings come from the delta bound (see :mod:`common.secagg_math`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarray_to_bytes,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
    SecAggPlusWorkflow,
)
from flwr.serverapp import Grid

from ..common import wire
from ..common.config import SecureAggregationConfig
from ..common.packing import AdapterLayout
from ..common.secagg_math import (
    QuantizationPlan,
    count_or_fraction,
    quantized_weight,
)
from ..common.wirebytes import content_bytes
from .payloads import array_view
from .replies import addressee_of
from .secagg_wire import widen_masked_vectors

log = logging.getLogger(__name__)


class _BridgeStrategy(Strategy):
    """Legacy strategy that only carries fit instructions in and the aggregate out."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self._instructions = instructions
        self.results: list[tuple[ClientProxy, FitRes]] | None = None
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self._instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        # Every FitRes carries the same unmasked weighted mean (the workflow's doing).
        self.results, self.failures = results, failures
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, *args: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, *args: Any) -> None:
        return None


class _ObservedSecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, noting the per-round share settings and the unmask time."""

    num_shares_used = 0
    threshold_used = 0
    unmask_seconds = 0.0

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        proceed = super().setup_stage(grid, context, state)
        self.num_shares_used, self.threshold_used = state.num_shares, state.threshold
        return proceed

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        proceed = super().share_keys_stage(grid, context, state)
        # Flower 1.41 treats every sampled node missing at unmask as "dead" and asks
        # the others for its key share. A node that dropped before its shares went out
        # (a site gone before or during the round's first stages) left no shares to
        # ask for: the others fail with a KeyError and the round is lost. Only nodes
        # whose shares were distributed can be dead; the others never masked with them.
        state.sampled_node_ids = set(state.active_node_ids)
        return proceed

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        start = time.perf_counter()
        try:
            return super().unmask_stage(grid, context, state)
        finally:
            self.unmask_seconds = time.perf_counter() - start


@dataclass
class _RecordingGrid:
    """Delegates to the real grid; notes each node's bytes and failed replies."""

    grid: Grid
    bytes_up: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> list[Message]:
        sent = {int(m.metadata.dst_node_id) for m in messages}
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        node_of = addressee_of(messages)
        answered = set()
        readable = []
        for reply in replies:
            size = 0 if reply.has_error() else content_bytes(reply.content)
            node = node_of(reply)
            answered.add(node)
            try:
                widen_masked_vectors(reply)
            except ValueError as error:
                # One site's unreadable vector drops that site, not the round.
                self.errors.setdefault(node, f"unreadable masked vector: {error}")
                continue
            readable.append(reply)
            if reply.has_error():
                self.errors.setdefault(node, reply.error.reason or "")
            else:
                self.bytes_up[node] = self.bytes_up.get(node, 0) + size
        for node in sent - answered:
            self.errors.setdefault(node, "no reply before the stage timed out")
        return readable

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


@dataclass(frozen=True)
class SecureRoundResult:
    """What one SecAgg+ training phase produced."""

    mean_delta: OrderedDict[str, np.ndarray] | None
    """The example-weighted mean delta (float32), or None if the protocol halted."""
    site_metrics: dict[int, dict[str, Any]]
    """node id -> the site's numeric metrics (as sent alongside its masked vector)."""
    failures: dict[int, str]
    """node id -> why it did not contribute."""
    bytes_up: dict[int, int]
    """node id -> bytes the site sent in all four stages."""
    weight_sum: float
    """Sum of the quantized weights (num examples / max-weight) that were unmasked."""
    num_shares: int
    threshold: int
    unmask_seconds: float
    """Server time of the unmask stage (reconstruction and dequantization)."""
    protocol_seconds: float
    """Wall time of all four stages, local training included."""


def run_secure_train(
    grid: Grid,
    messages: Sequence[Message],
    *,
    server_round: int,
    payload_shapes: Mapping[str, tuple[int, ...]],
    settings: SecureAggregationConfig,
    plan: QuantizationPlan,
    arrays_key: str,
    config_key: str,
) -> SecureRoundResult:
    """Run SecAgg+ over the train ``messages`` our strategy built for this round."""
    recording = _RecordingGrid(grid)
    run_id = int(messages[0].metadata.run_id) if messages else 0
    bridge = _BridgeStrategy(
        [
            _fit_instruction(msg, grid, run_id, arrays_key, config_key)
            for msg in messages
        ]
    )
    workflow = _ObservedSecAggPlus(
        num_shares=count_or_fraction(settings.num_shares),
        reconstruction_threshold=count_or_fraction(settings.reconstruction_threshold),
        max_weight=plan.max_weight,
        clipping_range=plan.clipping_range,
        quantization_range=plan.quantization_range,
        modulus_range=plan.modulus_range,
        timeout=settings.stage_timeout_s,
    )
    start = time.perf_counter()
    workflow(recording, _legacy_context(bridge, run_id, server_round))  # type: ignore[arg-type]
    observed: dict[str, Any] = {
        "num_shares": workflow.num_shares_used,
        "threshold": workflow.threshold_used,
        "unmask_seconds": workflow.unmask_seconds,
        "protocol_seconds": time.perf_counter() - start,
    }
    sampled = {int(m.metadata.dst_node_id) for m in messages}
    results = bridge.results or []
    failures = _failures(sampled, bridge, recording)
    site_metrics = {
        int(proxy.node_id): {**fit_res.metrics, wire.NUM_EXAMPLES: fit_res.num_examples}
        for proxy, fit_res in results
    }
    if not results:  # the protocol halted, or nobody contributed
        return SecureRoundResult(
            None, site_metrics, failures, recording.bytes_up, 0.0, **observed
        )
    return SecureRoundResult(
        mean_delta=_named_mean(results[0][1].parameters, payload_shapes),
        site_metrics=site_metrics,
        failures=failures,
        bytes_up=recording.bytes_up,
        weight_sum=sum(quantized_weight(fr.num_examples, plan) for _, fr in results),
        **observed,
    )


def _fit_instruction(
    msg: Message, grid: Grid, run_id: int, arrays_key: str, config_key: str
) -> tuple[ClientProxy, FitIns]:
    """A Message-API train message as the legacy (proxy, FitIns) pair."""
    arrays = msg.content.array_records[arrays_key]
    config: dict[str, Any] = (
        dict(msg.content[config_key]) if config_key in msg.content else {}
    )
    fit_ins = FitIns(parameters=_legacy_parameters(arrays), config=config)
    node = int(msg.metadata.dst_node_id)
    return GridClientProxy(node, grid, run_id), fit_ins


def _legacy_parameters(arrays: ArrayRecord) -> Parameters:
    """The packed adapter (wire version 2, one float32 array) as legacy Parameters.

    Legacy tensors are the arrays' .npy bytes as ``ndarray_to_bytes`` writes them,
    which is what an ``Array`` made from a numpy array holds: float32 arrays are
    passed on as they are, not decoded and encoded again once per site. The train
    messages share one record, so every site's instruction shares its bytes.
    """
    tensors = []
    for key in arrays.keys():
        array = arrays[key]
        if array.stype == "numpy.ndarray" and array_view(array).dtype == np.float32:
            tensors.append(array.data)
        else:
            tensors.append(ndarray_to_bytes(np.asarray(array.numpy(), np.float32)))
    return Parameters(tensors=tensors, tensor_type="numpy.ndarray")


def _legacy_context(
    bridge: _BridgeStrategy, run_id: int, server_round: int
) -> LegacyContext:
    """The legacy workflow's context for one round, with no global parameters."""
    context = LegacyContext(
        context=Context(
            run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
        ),
        strategy=bridge,
        client_manager=SimpleClientManager(),
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        Parameters(tensors=[], tensor_type="numpy.ndarray"), keep_input=True
    )
    return context


def _failures(
    sampled: set[int], bridge: _BridgeStrategy, recording: _RecordingGrid
) -> dict[int, str]:
    """Node id -> why a sampled site's update is not in the aggregate."""
    halted = bridge.results is None
    contributed = (
        set() if halted else {int(proxy.node_id) for proxy, _ in bridge.results or []}
    )
    fallback = (
        "secure aggregation halted: fewer live sites than the reconstruction threshold"
        if halted
        else "left the secure-aggregation protocol"
    )
    return {
        node: recording.errors.get(node, fallback)
        for node in sorted(sampled - contributed)
    }


def _named_mean(
    parameters: Parameters, payload_shapes: Mapping[str, tuple[int, ...]]
) -> OrderedDict[str, np.ndarray]:
    """The unmasked mean, one packed vector, as the payload's named tensors."""
    mean = parameters_to_ndarrays(parameters)
    layout = AdapterLayout.of_shapes(payload_shapes)
    if len(mean) != 1 or tuple(mean[0].shape) != (layout.size,):
        raise ValueError(
            "the secure aggregate does not match the packed adapter payload "
            f"({len(mean)} array(s) for one of {layout.size} values)"
        )
    return layout.unpack(np.asarray(mean[0], dtype=np.float32))
