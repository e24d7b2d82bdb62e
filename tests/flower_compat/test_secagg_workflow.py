"""SecAgg+ through the coordinator's bridge: the unmasked mean equals the plain one.

Sites here are minimal ClientApps that reply with known deltas through Flower's
own SecAgg+ mod (via wardround's dispatch mod), on an in-process grid.
"""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from wardround.client.secure_aggregation import make_secure_aggregation_mod
from wardround.common.adapter import clip_l2, to_record
from wardround.common.aggregation import weighted_mean
from wardround.common.config import SecureAggregationConfig
from wardround.common.packing import AdapterLayout
from wardround.common.secagg_math import (
    mean_error_bound,
    plan_quantization,
    quantized_weight,
)
from wardround.flower_compat.secagg_workflow import run_secure_train
from wardround.simulations.local_grid import LocalGrid, vanish_at_secagg_stage

SHAPES = OrderedDict(
    [("a.lora_A.weight", (4, 16)), ("b.lora_B.weight", (16, 4)), ("head.weight", (3,))]
)
BOUND = 2.0
LAYOUT = AdapterLayout.of_shapes(SHAPES)


def _deltas(n_sites: int, seed: int = 0) -> list[OrderedDict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_sites):
        raw = OrderedDict(
            (k, rng.normal(0, 0.3 * (i + 1), s).astype(np.float32))
            for k, s in SHAPES.items()
        )
        out.append(clip_l2(raw, BOUND)[0])
    return out


def _site_app(delta: OrderedDict, num_examples: int) -> ClientApp:
    app = ClientApp(mods=[make_secure_aggregation_mod(lambda m, c: None)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        assert fit_ins.config["base-model-fingerprint"] == "fp"
        # wire version 2: the global adapter arrives as one packed array
        assert len(fit_ins.parameters.tensors) == 1
        content = compat.fitres_to_recorddict(
            FitRes(
                status=Status(Code.OK, "Success"),
                parameters=ndarrays_to_parameters([LAYOUT.pack(delta)]),
                num_examples=min(
                    num_examples, int(fit_ins.config["secagg-max-weight"])
                ),
                metrics={"train-loss": 0.5},
            ),
            keep_input=True,
        )
        return Message(content, reply_to=msg)

    return app


def _train_messages(nodes: list[int]) -> list[Message]:
    weights = to_record(
        OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    )
    return [
        Message(
            RecordDict(
                {
                    "arrays": weights,
                    "config": ConfigRecord(
                        {"base-model-fingerprint": "fp", "server-round": 1}
                    ),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id="1",
        )
        for node in nodes
    ]


def _run(n_sites: int, examples: list[int], vanish=None, settings=None):
    deltas = _deltas(n_sites)
    nodes = [101 + i for i in range(n_sites)]
    apps = {
        node: _site_app(d, n)
        for node, d, n in zip(nodes, deltas, examples, strict=True)
    }
    grid = LocalGrid(apps, {n: {} for n in nodes}, {}, vanish=vanish)
    plan = plan_quantization(BOUND, n_sites, max(examples))
    messages = _train_messages(nodes)
    for m in messages:
        m.content["config"]["secagg-max-weight"] = plan.max_weight
    result = run_secure_train(
        grid,
        messages,
        server_round=1,
        payload_shapes=dict(SHAPES),
        settings=settings or SecureAggregationConfig(),
        plan=plan,
        arrays_key="arrays",
        config_key="config",
    )
    return deltas, nodes, plan, result, grid


def test_secure_mean_equals_plain_weighted_mean_within_the_stated_bound():
    examples = [120, 300, 75, 210]
    deltas, nodes, plan, result, _ = _run(4, examples)
    assert result.failures == {}
    exact = weighted_mean(deltas, [float(n) for n in examples])
    bound = mean_error_bound(plan, 4, BOUND, result.weight_sum)
    assert result.weight_sum == pytest.approx(
        sum(quantized_weight(n, plan) for n in examples)
    )
    worst = max(float(np.max(np.abs(result.mean_delta[k] - exact[k]))) for k in SHAPES)
    assert worst <= bound
    assert bound < 1e-6  # the bound is small at these settings, not vacuous
    assert all(result.mean_delta[k].dtype == np.float32 for k in SHAPES)
    # the coordinator saw each site's numbers but never its vector
    assert set(result.site_metrics) == set(nodes)


def test_quantization_error_stays_within_bound_at_a_coarse_range():
    # With a deliberately coarse quantizer the error is visible, and still bounded.
    deltas = _deltas(3, seed=5)
    examples = [50, 80, 20]
    plan = plan_quantization(BOUND, 3, 80)
    coarse = type(plan)(plan.clipping_range, 2**12, plan.modulus_range, plan.max_weight)
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    weights = [quantized_weight(n, coarse) for n in examples]
    summed = None
    for d, w in zip(deltas, weights, strict=True):
        q = quantize(
            [v * w for v in d.values()],
            coarse.clipping_range,
            coarse.quantization_range,
        )
        summed = (
            q if summed is None else [a + b for a, b in zip(summed, q, strict=True)]
        )
    recon = dequantize(summed, coarse.clipping_range, coarse.quantization_range)
    recon = [
        (r - (len(deltas) - 1) * coarse.clipping_range) / sum(weights) for r in recon
    ]
    exact = weighted_mean(deltas, [float(n) for n in examples])
    bound = mean_error_bound(coarse, 3, BOUND, sum(weights))
    worst = max(
        float(np.max(np.abs(r - exact[k]))) for r, k in zip(recon, SHAPES, strict=True)
    )
    assert 0 < worst <= bound


@pytest.mark.parametrize(
    "stage",
    [
        "setup",  # gone before the round (still listed by the coordinator)
        "share_keys",  # gone before its key shares went out
        "collect_masked_vectors",  # gone after sharing its keys
    ],
)
def test_a_site_killed_mid_round_and_the_round_still_aggregates(stage):
    examples = [100, 150, 90, 130, 110]
    victim = 103

    vanish = vanish_at_secagg_stage(stage, [victim])

    deltas, nodes, plan, result, grid = _run(5, examples, vanish=vanish)
    assert victim in grid.dead
    assert set(result.failures) == {victim}
    survivors = [i for i, n in enumerate(nodes) if n != victim]
    exact = weighted_mean(
        [deltas[i] for i in survivors], [float(examples[i]) for i in survivors]
    )
    bound = mean_error_bound(plan, 4, BOUND, result.weight_sum)
    worst = max(float(np.max(np.abs(result.mean_delta[k] - exact[k]))) for k in SHAPES)
    assert worst <= bound


def test_too_many_dropouts_halt_the_protocol_without_a_result():
    examples = [100, 100, 100]

    vanish = vanish_at_secagg_stage("share_keys", [102, 103])

    _, _, _, result, _ = _run(3, examples, vanish=vanish)
    assert result.mean_delta is None
    assert set(result.failures) == {101, 102, 103}
    assert "halted" in result.failures[101]


@pytest.mark.parametrize("sites", [2, 5, 60, 500])
def test_plan_never_overflows_the_modulus(sites):
    plan = plan_quantization(1.0, sites, 1000)
    assert (sites + 1) * plan.quantization_range <= plan.modulus_range
    assert plan.quantization_range <= 2**30


@pytest.mark.usefixtures("task_identity")
def test_the_recording_grid_names_a_site_the_superlink_answered_for():
    """The SuperLink answers for an offline site with its own node id as the sender:
    the failure belongs to the site the message went to, never to the SuperLink."""
    from wardround.flower_compat.constants import SUPERLINK_NODE_ID
    from wardround.flower_compat.replies import superlink_offline_reply
    from wardround.flower_compat.secagg_workflow import _RecordingGrid

    class PushingGrid:
        def send_and_receive(self, messages, *, timeout=None):
            for msg in messages:  # pushing gives each message its id
                msg.metadata.__dict__["_message_id"] = msg.object_id
            return [
                superlink_offline_reply(msg.metadata, "node_unavail")
                if msg.metadata.dst_node_id == 103
                else Message(
                    RecordDict({"config": ConfigRecord({"x": 1})}), reply_to=msg
                )
                for msg in messages
            ]

    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        for node in (101, 102, 103)
    ]
    recording = _RecordingGrid(PushingGrid())

    replies = recording.send_and_receive(messages)

    assert len(replies) == 3
    assert set(recording.errors) == {103} and SUPERLINK_NODE_ID not in recording.errors
    assert "heartbeat" in recording.errors[103]
    assert set(recording.bytes_up) == {101, 102}


@pytest.mark.usefixtures("task_identity")
def test_an_unreadable_masked_vector_drops_its_site_not_the_round():
    from wardround.common.npy import npy_bytes
    from wardround.flower_compat.secagg_protocol import RECORD_KEY_CONFIGS, Key
    from wardround.flower_compat.secagg_workflow import _RecordingGrid

    good = [npy_bytes(np.arange(4, dtype=np.uint32))]
    vectors = {1: good, 2: [npy_bytes(np.arange(4, dtype=np.uint32)) + b"hidden"]}
    sent = []
    for node in vectors:
        msg = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = f"m{node}"
        sent.append(msg)

    class _Grid:
        def send_and_receive(self, messages, *, timeout=None):
            return [
                Message(
                    RecordDict(
                        {
                            RECORD_KEY_CONFIGS: ConfigRecord(
                                {Key.MASKED_PARAMETERS: list(vectors[node])}
                            )
                        }
                    ),
                    reply_to=msg,
                )
                for msg, node in zip(messages, vectors, strict=True)
            ]

    recording = _RecordingGrid(_Grid())  # type: ignore[arg-type]
    replies = recording.send_and_receive(sent)

    assert [int(r.metadata.reply_to_message_id[1:]) for r in replies] == [1]
    widened = replies[0].content.config_records[RECORD_KEY_CONFIGS]
    assert widened[Key.MASKED_PARAMETERS] == [npy_bytes(np.arange(4, dtype=np.int64))]
    assert "unreadable masked vector" in recording.errors[2]
    assert 1 not in recording.errors
