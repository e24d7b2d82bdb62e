"""Strategies as objects: what each puts in its messages, records and aggregates."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from grid_helpers import StubGrid

from wardround.common import wire
from wardround.common.adapter import to_record
from wardround.common.config import (
    FederationConfig,
    SecureAggregationConfig,
    TransportDtype,
)
from wardround.common.packing import AdapterLayout
from wardround.common.secagg_math import plan_quantization
from wardround.flower_compat.legacy import ndarray_to_bytes
from wardround.flower_compat.replies import superlink_offline_reply
from wardround.server.replies import check_train_reply, split_replies
from wardround.server.strategies import (
    ExchangeLimits,
    FedAvg,
    FedProx,
    SecAggPlus,
    make_strategy,
)
from wardround.server.strategies.secagg_plus import UNKNOWN_MAX_WEIGHT

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a run

NODES = [101, 102, 103]
FEDERATION = {"min_sites": 3, "fraction_train": 1.0, "delta_clip_norm": 100.0}


class ReplyingGrid(StubGrid):
    """Each node replies with what ``reply`` builds for it."""

    def __init__(self, reply) -> None:
        super().__init__(NODES)
        self.reply = reply

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        return [self.reply(msg) for msg in messages]


def _delta(value: float) -> OrderedDict:
    return OrderedDict(w=np.full((2, 2), value, np.float32))


def _reply(msg: Message, content: dict) -> Message:
    return Message(RecordDict(content), reply_to=msg)


def _train_reply(msg: Message, value: float, examples: int = 10) -> Message:
    node = int(msg.metadata.dst_node_id)
    return _reply(
        msg,
        {
            wire.ADAPTER_DELTA: to_record(_delta(value)),
            wire.METRICS: MetricRecord(
                {
                    wire.NUM_EXAMPLES: examples,
                    wire.SITE_INDEX: NODES.index(node),
                    wire.WIRE_VERSION_KEY: wire.WIRE_VERSION,
                }
            ),
        },
    )


def _train_messages(strategy, grid) -> list[Message]:
    return list(
        strategy.configure_train(
            1, to_record(_delta(0.0)), ConfigRecord({wire.RUN_ID: "r"}), grid
        )
    )


def test_fedavg_sends_no_proximal_term_and_records_none():
    strategy = make_strategy(FederationConfig(**FEDERATION))
    messages = _train_messages(strategy, ReplyingGrid(None))

    assert isinstance(strategy, FedAvg) and not isinstance(strategy, FedProx)
    assert sorted(int(m.metadata.dst_node_id) for m in messages) == NODES
    assert all(wire.PROXIMAL_MU not in m.content[wire.CONFIG] for m in messages)
    assert strategy.manifest_settings() == {"strategy": "fedavg", "proximal_mu": 0.0}


def test_fedprox_sends_its_proximal_term_and_records_what_it_sent():
    federation = FederationConfig(strategy="fedprox", proximal_mu=0.25, **FEDERATION)
    strategy = make_strategy(federation)
    messages = _train_messages(strategy, ReplyingGrid(None))

    assert isinstance(strategy, FedProx)
    assert [m.content[wire.CONFIG][wire.PROXIMAL_MU] for m in messages] == [0.25] * 3
    assert strategy.manifest_settings() == {"strategy": "fedprox", "proximal_mu": 0.25}


def test_secagg_plus_wraps_the_configured_strategy():
    federation = FederationConfig(strategy="fedprox", proximal_mu=0.5, **FEDERATION)
    strategy = make_strategy(federation, SecureAggregationConfig(enabled=True))
    messages = _train_messages(strategy, ReplyingGrid(None))

    assert isinstance(strategy, SecAggPlus) and isinstance(strategy.inner, FedProx)
    assert [m.content[wire.CONFIG][wire.PROXIMAL_MU] for m in messages] == [0.5] * 3
    assert strategy.manifest_settings()["proximal_mu"] == 0.5
    plain = make_strategy(federation, SecureAggregationConfig(enabled=False))
    assert isinstance(plain, FedProx)


def test_secagg_plus_sizes_its_max_weight_from_the_sites_it_was_told_of():
    strategy = SecAggPlus(
        FedAvg(FederationConfig(**FEDERATION)), SecureAggregationConfig(), 1.0
    )
    unknown = strategy._plan([101, 102, 103])
    strategy.note_train_examples(101, 500)
    strategy.note_train_examples(102, 80)

    assert (
        unknown.max_weight == plan_quantization(1.0, 3, UNKNOWN_MAX_WEIGHT).max_weight
    )
    assert strategy._plan([101, 102, 103]).max_weight == (
        plan_quantization(1.0, 3, 500).max_weight
    )


PAYLOAD = AdapterLayout.of_shapes({"w": (2, 2)})


def _limits() -> ExchangeLimits:
    return ExchangeLimits(server_round=1, timeout_s=5.0, payload_shapes={"w": (2, 2)})


def test_fedavg_aggregates_the_example_weighted_mean_of_the_deltas():
    values = {101: 1.0, 102: 2.0, 103: 4.0}
    examples = {101: 10, 102: 30, 103: 60}

    def reply(msg):
        node = int(msg.metadata.dst_node_id)
        return _train_reply(msg, values[node], examples[node])

    strategy = FedAvg(FederationConfig(**FEDERATION))
    grid = ReplyingGrid(reply)
    exchange = strategy.exchange_train(grid, _train_messages(strategy, grid), _limits())

    assert exchange.failures == []
    assert [c.node_id for c in exchange.contributions] == NODES
    expected = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100
    np.testing.assert_allclose(exchange.mean_delta["w"], expected, rtol=1e-6)


def test_a_site_that_replies_weights_is_a_failure_and_left_out_of_the_mean():
    def reply(msg):
        good = _train_reply(msg, 1.0)
        if int(msg.metadata.dst_node_id) != 103:
            return good
        # trained weights where the delta belongs: adding them would double the adapter
        content = dict(good.content)
        content[wire.GLOBAL_ADAPTER] = to_record(_delta(50.0))
        return _reply(msg, content)

    strategy = FedAvg(FederationConfig(**FEDERATION))
    grid = ReplyingGrid(reply)
    exchange = strategy.exchange_train(grid, _train_messages(strategy, grid), _limits())

    assert [f.node_id for f in exchange.failures] == [103]
    assert "the round needs a delta" in exchange.failures[0].reason
    assert [c.node_id for c in exchange.contributions] == [101, 102]
    np.testing.assert_allclose(exchange.mean_delta["w"], 1.0)


def test_a_reply_checks_its_payload_kind_when_it_states_one():
    grid = ReplyingGrid(None)
    msg = _train_messages(FedAvg(FederationConfig(**FEDERATION)), grid)[0]
    plain = _train_reply(msg, 1.0)
    tagged = {
        kind: _reply(
            msg,
            {
                **dict(plain.content),
                wire.CONFIG: ConfigRecord({wire.PAYLOAD_KIND: kind}),
            },
        )
        for kind in (wire.PayloadKind.DELTA.value, wire.PayloadKind.WEIGHTS.value)
    }
    no_array = _reply(msg, {**dict(plain.content), wire.ADAPTER_DELTA: ConfigRecord()})

    check = functools.partial(check_train_reply, payload=PAYLOAD)
    assert check(plain) is None
    assert check(tagged["delta"]) is None
    assert "payload kind is 'weights'" in check(tagged["weights"])
    assert "not an ArrayRecord" in check(no_array)
    ok, failed = split_replies(
        [plain, tagged["weights"]],
        "train",
        (wire.ADAPTER_DELTA, wire.METRICS),
        check=check,
    )
    assert ok == [plain] and [f.phase for f in failed] == ["train"]


def test_a_reply_of_another_wire_version_or_layout_is_a_failure():
    grid = ReplyingGrid(None)
    msg = _train_messages(FedAvg(FederationConfig(**FEDERATION)), grid)[0]
    plain = _train_reply(msg, 1.0)
    metrics = dict(plain.content[wire.METRICS])
    old = _reply(
        msg,
        {
            wire.ADAPTER_DELTA: ArrayRecord({"w": Array(_delta(1.0)["w"])}),
            wire.METRICS: MetricRecord(
                {k: v for k, v in metrics.items() if k != wire.WIRE_VERSION_KEY}
            ),
        },
    )
    other_layout = _reply(
        msg,
        {
            wire.ADAPTER_DELTA: to_record(OrderedDict(w=np.zeros(5, np.float32))),
            wire.METRICS: plain.content[wire.METRICS],
        },
    )
    check = functools.partial(check_train_reply, payload=PAYLOAD)

    assert "speaks no wire version (1)" in check(old)
    assert "needs (4,)" in check(other_layout)


def test_fedavg_reads_the_runs_half_precision_deltas_and_refuses_float32_ones():
    federation = FederationConfig(**FEDERATION, transport_dtype="bfloat16")

    def reply(msg):
        node = int(msg.metadata.dst_node_id)
        value = {101: 1.0, 102: 3.0, 103: 5.0}[node]
        transport = "float32" if node == 103 else "bfloat16"
        good = _train_reply(msg, value)
        content = dict(good.content)
        content[wire.ADAPTER_DELTA] = to_record(
            _delta(value), TransportDtype(transport)
        )
        return _reply(msg, content)

    strategy = FedAvg(federation)
    grid = ReplyingGrid(reply)
    exchange = strategy.exchange_train(grid, _train_messages(strategy, grid), _limits())

    assert [f.node_id for f in exchange.failures] == [103]
    assert "travels as uint16" in exchange.failures[0].reason
    np.testing.assert_allclose(exchange.mean_delta["w"], 2.0)


def test_a_delta_with_nan_or_beyond_the_clip_norm_is_left_out():
    """Every honest site clips its delta; one that does not would move the global
    adapter for all (and NaN would stop every site at the next round)."""

    def reply(msg):
        node = int(msg.metadata.dst_node_id)
        delta = _delta({101: 1.0, 102: 3.0, 103: 1.0}[node])  # norms 2, 6, 2
        if node == 103:
            delta["w"][0, 0] = np.nan
        content = dict(_train_reply(msg, 0.0).content)
        content[wire.ADAPTER_DELTA] = to_record(delta)
        return _reply(msg, content)

    strategy = FedAvg(
        FederationConfig(**{**FEDERATION, "min_sites": 1, "delta_clip_norm": 4.0})
    )
    grid = ReplyingGrid(reply)
    exchange = strategy.exchange_train(grid, _train_messages(strategy, grid), _limits())

    reasons = {f.node_id: f.reason for f in exchange.failures}
    assert set(reasons) == {102, 103}
    assert "L2 norm 6, above federation.delta-clip-norm = 4" in reasons[102]
    assert "NaN or infinity" in reasons[103]
    np.testing.assert_allclose(exchange.mean_delta["w"], 1.0)


def test_a_reply_that_lies_about_its_array_or_counts_is_its_own_failure():
    """Declared shape and dtype are the site's words: only the bytes are read, and
    nothing a site sends can stop the round for the others."""

    def lying(shape, dtype, data):
        return ArrayRecord(
            {
                wire.PACKED_ADAPTER: Array(
                    dtype=dtype, shape=shape, stype="numpy.ndarray", data=data
                )
            }
        )

    def reply(msg):
        node = int(msg.metadata.dst_node_id)
        content = dict(_train_reply(msg, 1.0).content)
        if node == 102:  # says (4,) float32, holds one float64
            content[wire.ADAPTER_DELTA] = lying(
                (4,), "float32", ndarray_to_bytes(np.zeros(1))
            )
        elif node == 103:  # bytes that are no .npy at all
            content[wire.ADAPTER_DELTA] = lying((4,), "float32", b"\x93NUMPY garbage")
        return _reply(msg, content)

    strategy = FedAvg(FederationConfig(**{**FEDERATION, "min_sites": 1}))
    grid = ReplyingGrid(reply)
    messages = _train_messages(strategy, grid)
    exchange = strategy.exchange_train(grid, messages, _limits())

    reasons = {f.node_id: f.reason for f in exchange.failures}
    assert set(reasons) == {102, 103}
    assert "shape (1,)" in reasons[102]
    assert "does not decode" in reasons[103]
    assert [c.node_id for c in exchange.contributions] == [101]
    check = functools.partial(check_train_reply, payload=PAYLOAD)
    plain = _train_reply(messages[0], 1.0)
    for count in (-1, 0, [5, 5], 10**12, 2.5):
        metrics = MetricRecord(
            {**dict(plain.content[wire.METRICS]), wire.NUM_EXAMPLES: count}
        )
        lying_count = _reply(
            messages[0], {**dict(plain.content), wire.METRICS: metrics}
        )
        assert "'num-examples' is not a whole number" in check(lying_count)


class OfflineNodeGrid(ReplyingGrid):
    """Pushes as Flower's grids do (each message gets its id); the SuperLink answers
    for node 103, which missed its heartbeats, with its own node id as the sender."""

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
        return [
            superlink_offline_reply(msg.metadata, "node_unavail")
            if msg.metadata.dst_node_id == 103
            else self.reply(msg)
            for msg in messages
        ]


def test_a_site_the_superlink_declared_offline_is_named_once_by_its_own_node_id():
    strategy = FedAvg(FederationConfig(**{**FEDERATION, "min_sites": 2}))
    grid = OfflineNodeGrid(lambda msg: _train_reply(msg, 1.0))
    exchange = strategy.exchange_train(grid, _train_messages(strategy, grid), _limits())

    assert [c.node_id for c in exchange.contributions] == [101, 102]
    assert [(f.node_id, f.phase) for f in exchange.failures] == [(103, "train")]
    assert "heartbeat" in exchange.failures[0].reason


@pytest.mark.parametrize(("norm", "discarded"), [(3.9, False), (4.5, True)])
def test_a_secure_mean_beyond_what_clipped_deltas_allow_is_discarded(
    monkeypatch, norm, discarded
):
    # SecAgg+ bounds each coordinate only; the mean of deltas clipped to B has an
    # L2 norm of at most B, so a larger one means some site skipped the clip.
    import wardround.server.strategies.secagg_plus as secagg_plus
    from wardround.flower_compat.secagg_workflow import SecureRoundResult

    mean = OrderedDict(w=np.full((2, 2), norm / 2, np.float32))  # L2 norm: norm
    result = SecureRoundResult(
        mean_delta=mean,
        site_metrics={n: {wire.NUM_EXAMPLES: 10} for n in NODES},
        failures={},
        bytes_up=dict.fromkeys(NODES, 100),
        weight_sum=3.0,
        num_shares=3,
        threshold=2,
        unmask_seconds=0.1,
        protocol_seconds=1.0,
    )
    monkeypatch.setattr(secagg_plus, "run_secure_train", lambda *a, **k: result)
    federation = FederationConfig(**{**FEDERATION, "delta_clip_norm": 4.0})
    strategy = SecAggPlus(FedAvg(federation), SecureAggregationConfig(), 4.0)
    grid = ReplyingGrid(None)

    exchange = strategy.exchange_train(grid, _train_messages(strategy, grid), _limits())

    if discarded:
        assert exchange.mean_delta is None and exchange.contributions == []
        assert {f.node_id for f in exchange.failures} == set(NODES)
        assert all(f.kind == "SecureMeanOutOfBound" for f in exchange.failures)
        assert "L2 norm 4.5, above the 4.04" in exchange.failures[0].reason
    else:
        assert exchange.failures == []
        np.testing.assert_allclose(exchange.mean_delta["w"], norm / 2)


def _round_phases():
    """A coordinator's round phases with nothing behind them (for its verdicts)."""
    from wardround.common.config import RunConfig
    from wardround.server.phases import RoundPhases

    return RoundPhases(
        strategy=None,
        grid=None,
        config=RunConfig(),
        fingerprint="f",
        name_of=lambda node, index: f"site-{node}",
        run_id="run",
        payload_shapes={},
    )


def test_a_discarded_secure_mean_stops_the_run_saying_so_once():
    from wardround.common.errors import FederationError
    from wardround.server.phases import ShortRound
    from wardround.server.records import SiteFailure
    from wardround.server.strategies.secagg_plus import SECURE_MEAN_OUT_OF_BOUND

    phases = _round_phases()
    reason = "the unmasked mean delta has L2 norm 99, above the 64.6 that ..."
    failures = [
        SiteFailure(n, "train", reason, SECURE_MEAN_OUT_OF_BOUND) for n in NODES
    ]
    # a site that also dropped out does not make the round worth asking again
    gone = SiteFailure(9, "train", "left the secure-aggregation protocol", None, True)
    short = ShortRound(0, [*failures, gone])
    assert not short.sites_went_away

    with pytest.raises(FederationError) as raised:
        raise phases.stop_short(4, short)

    assert raised.value.message == f"round 4: {reason}"
    assert "min-sites" not in raised.value.hint
    assert "SecAgg+ hides which site" in raised.value.hint


def test_a_round_every_site_refuses_as_over_its_answers_says_a_new_run_is_needed():
    from wardround.common.errors import PrivacyPolicyRefused
    from wardround.server.phases import ShortRound
    from wardround.server.records import SiteFailure

    phases = _round_phases()
    reason = "this site has answered 3 train message(s) for this run, the most ..."
    failures = [SiteFailure(n, "train", reason, "AnswerRefused") for n in NODES]

    with pytest.raises(PrivacyPolicyRefused) as raised:
        raise phases.stop_short(3, ShortRound(0, failures))

    assert "min-sites" not in raised.value.hint
    assert "change run.toml and have the sites approve it" in raised.value.hint


def test_a_failed_round_names_the_sites_by_their_enrolled_names():
    from wardround.server.records import SiteFailure
    from wardround.server.replies import reasons

    names = {NODES[0]: "st-marys"}
    failures = [SiteFailure(n, "train", "[AppNotApproved] ...", "x") for n in NODES[:2]]

    said = reasons(failures, lambda node, index: names.get(node, f"node-{node}"))

    assert said.startswith(f"st-marys (node {NODES[0]}): [AppNotApproved]")
    assert f"; node {NODES[1]}: [AppNotApproved]" in said
