"""The site's replies, inspected as Flower messages (what actually leaves the site)."""

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType

from wardround.client.app import handle_evaluate, handle_train
from wardround.common import wire
from wardround.common.adapter import adapter_state, from_record, to_record, wire_header
from wardround.common.errors import FederationError, ModelMismatchError
from wardround.common.packing import AdapterLayout
from wardround.models import build_model

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def site_setup(synthetic_sites, tiny_config):
    # Plain train messages: SecAgg+ replies are tested in test_secagg_enforcement.py
    config = tiny_config.with_overrides(
        data={"sites_dir": str(synthetic_sites)},
        train={"max_steps": 2},
        secure_aggregation={"enabled": False},
    )
    built = build_model(config)
    context = Context(
        run_id=1,
        node_id=11,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=config.to_flower(),
    )
    return config, built, context


def _message(built, kind, fingerprint=None, run_id="test-run", payload_kind=None):
    extra = {} if payload_kind is None else {wire.PAYLOAD_KIND: payload_kind}
    content = RecordDict(
        {
            wire.GLOBAL_ADAPTER: to_record(adapter_state(built.model)),
            wire.CONFIG: ConfigRecord(
                {
                    wire.SERVER_ROUND: 1,
                    wire.BASE_FINGERPRINT: fingerprint or built.base_fingerprint,
                    **wire_header(adapter_state(built.model)),
                    wire.RUN_ID: run_id,
                    **extra,
                }
            ),
        }
    )
    return Message(content=content, dst_node_id=11, message_type=kind)


def test_train_reply_holds_only_the_adapter_delta_and_numbers(site_setup):
    config, built, context = site_setup
    reply = handle_train(_message(built, MessageType.TRAIN), context)

    assert set(reply.content.keys()) == {wire.ADAPTER_DELTA, wire.METRICS}
    delta = reply.content[wire.ADAPTER_DELTA]
    assert isinstance(delta, ArrayRecord)
    from peft import get_peft_model_state_dict

    declared = get_peft_model_state_dict(built.model)
    # wire version 2: the declared tensors packed into one float32 array
    assert list(delta.keys()) == [wire.PACKED_ADAPTER]
    layout = AdapterLayout.of_shapes({k: v.shape for k, v in declared.items()})
    unpacked = from_record(delta, layout)
    assert list(unpacked) == sorted(declared)
    assert all(a.dtype == np.float32 for a in unpacked.values())
    # frozen encoder weights never travel
    assert not any(
        "lora_" not in k and "encoder" in k and "ehr_encoder" not in k for k in unpacked
    )
    metrics = reply.content[wire.METRICS]
    assert isinstance(metrics, MetricRecord)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics[wire.NUM_EXAMPLES] > 0
    # training moved the adapter, so the delta is not all zeros
    assert metrics[wire.DELTA_L2] > 0


def test_evaluate_reply_is_numbers_with_fixed_names(site_setup):
    config, built, context = site_setup
    reply = handle_evaluate(_message(built, MessageType.EVALUATE), context)
    assert set(reply.content.keys()) == {wire.METRICS}
    metrics = reply.content[wire.METRICS]
    always = {
        wire.NUM_EXAMPLES,
        wire.TRAIN_EXAMPLES,
        wire.SITE_INDEX,
        wire.EVAL_LOSS,
        wire.AUROC_MACRO,
        wire.EVAL_SECONDS,
        *wire.VERSION_METRICS,
        *wire.PROTOCOL_METRICS,
    }
    per_label = {wire.AUROC_PREFIX + label for label in config.task.labels}
    # a label with one class at this site has no AUROC: it is left out, not NaN
    assert always <= set(metrics.keys()) <= always | per_label
    assert all(np.isfinite(v) for v in metrics.values())


def test_site_refuses_another_base_model(site_setup):
    _, built, context = site_setup
    with pytest.raises(ModelMismatchError, match="base model"):
        handle_train(_message(built, MessageType.TRAIN, fingerprint="0" * 64), context)


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_site_refuses_another_wire_version_or_layout_before_any_work(site_setup, kind):
    _, built, context = site_setup
    old = _message(built, kind)
    del old.content[wire.CONFIG][wire.WIRE_VERSION_KEY]
    with pytest.raises(FederationError, match=r"no wire version \(1\)"):
        (handle_train if kind == MessageType.TRAIN else handle_evaluate)(old, context)
    other = _message(built, kind)
    other.content[wire.CONFIG][wire.ADAPTER_LAYOUT] = "0" * 16
    with pytest.raises(ModelMismatchError, match="packs the adapter in layout"):
        (handle_train if kind == MessageType.TRAIN else handle_evaluate)(other, context)


def test_a_round_is_reproducible(site_setup):
    _, built, context = site_setup
    message = _message(built, MessageType.TRAIN)
    first = handle_train(message, context).content[wire.ADAPTER_DELTA]
    second = handle_train(message, context).content[wire.ADAPTER_DELTA]
    assert all(
        np.array_equal(first[k].numpy(), second[k].numpy()) for k in first.keys()
    )


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_site_refuses_a_global_adapter_that_says_it_is_a_delta(site_setup, kind):
    _, built, context = site_setup
    handler = handle_train if kind == MessageType.TRAIN else handle_evaluate
    delta = wire.PayloadKind.DELTA.value
    with pytest.raises(FederationError, match="'delta' payload as the global adapter"):
        handler(_message(built, kind, payload_kind=delta), context)


def test_site_trains_from_a_global_adapter_tagged_as_weights(site_setup):
    _, built, context = site_setup
    weights = wire.PayloadKind.WEIGHTS.value
    reply = handle_train(
        _message(built, MessageType.TRAIN, payload_kind=weights), context
    )
    assert reply.content[wire.METRICS][wire.NUM_EXAMPLES] > 0
