"""Payloads, messages and contexts shared by the egress-guard tests."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from wardround.common import wire
from wardround.common.errors import EgressViolation
from wardround.flower_compat.legacy import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
)
from wardround.flower_compat.legacy import recorddict_compat as compat

SHAPES = {"head.bias": (4,), "lora_A.weight": (2, 3), "lora_B.weight": (3, 2)}
"""Sorted by name, as a payload is; packed, 16 values."""
PACKED_SIZE = 16
LABELS = ("pneumonia", "edema")
SECRET = "Jane Doe, MRN 0042"


def _delta(shapes=SHAPES, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def _packed(delta: dict[str, np.ndarray]) -> np.ndarray:
    """The tensors concatenated in name order, as they are: no layout checks, so a
    test can pack a wrong one (a mixed dtype upcasts, as numpy does)."""
    return np.concatenate([delta[k].reshape(-1) for k in sorted(delta)])


def _train_content(delta=None, **metrics) -> RecordDict:
    arrays = ArrayRecord({wire.PACKED_ADAPTER: Array(_packed(delta or _delta()))})
    values = {
        wire.NUM_EXAMPLES: 12,
        wire.TRAIN_LOSS: 0.5,
        wire.WIRE_VERSION_KEY: wire.WIRE_VERSION,
        **metrics,
    }
    return RecordDict({wire.ADAPTER_DELTA: arrays, wire.METRICS: MetricRecord(values)})


def _eval_content(**metrics) -> RecordDict:
    values = {wire.NUM_EXAMPLES: 12, wire.EVAL_LOSS: 0.4, "auroc.edema": 0.7, **metrics}
    return RecordDict({wire.METRICS: MetricRecord(values)})


def _fitres_content(arrays=None, metrics=None, num_examples=12) -> RecordDict:
    ndarrays = [_packed(arrays or _delta())]
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(ndarrays),
        num_examples=num_examples,
        metrics=metrics if metrics is not None else {wire.TRAIN_LOSS: 0.5},
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def _refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(EgressViolation) as info:
        fn(*args, **kwargs)
    return info.value.message


def _message(
    kind: str, content: RecordDict | None = None, node_id: int = 11
) -> Message:
    return Message(
        content=content or RecordDict(), dst_node_id=node_id, message_type=kind
    )


def _context(node_id: int = 11) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={}
    )
