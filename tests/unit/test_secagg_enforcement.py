"""A hostile coordinator under an approved SecAgg+ run: every attempt is refused.

The sites are the real ClientApps (``build_client_app``) answering real Flower
Messages; the coordinator is wardround's own SecAgg+ bridge on an in-process grid,
with one message changed on its way to the sites, or a message crafted by hand.
Each refusal reaches the coordinator as a sanitized error reply, is logged, and
leaves the site's privacy ledger untouched (nothing trained, nothing reserved).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp

from wardround.client.app import build_client_app
from wardround.client.egress_mods import error_sanitizing_mod
from wardround.client.secure_aggregation import make_secure_aggregation_mod
from wardround.common import wire
from wardround.common.adapter import adapter_state, to_record, wire_header
from wardround.common.config import SecureAggregationConfig
from wardround.common.config.sections import DEFAULT_DELTA_CLIP_NORM
from wardround.common.errors import error_kind
from wardround.common.secagg_math import plan_quantization
from wardround.flower_compat.legacy import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
)
from wardround.flower_compat.legacy import recorddict_compat as compat
from wardround.flower_compat.secagg_protocol import RECORD_KEY_CONFIGS, Key, Stage
from wardround.flower_compat.secagg_workflow import run_secure_train
from wardround.models import build_model
from wardround.simulations.local_grid import LocalGrid

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = (1000, 1001, 1002)
REFUSED = "SecureAggregationRefused"

Tamper = Callable[[int, Message], None]
"""(destination node, message) -> None: changes the message in place."""


class HostileGrid(LocalGrid):
    """An in-process grid whose coordinator changes messages before they leave."""

    def __init__(self, *args, tamper: Tamper, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._tamper = tamper

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            self._tamper(int(msg.metadata.dst_node_id), msg)
        return super().push_messages(messages)


def _at_stage(stage: str, change: Tamper) -> Tamper:
    def tamper(node: int, msg: Message) -> None:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == stage:
            change(node, msg)

    return tamper


@pytest.fixture(scope="module")
def federation(three_sites, tiny_config, tmp_path_factory):
    """Three hospitals of their own (a private ledger) and the run they approved."""
    root = tmp_path_factory.mktemp("hostile") / "sites"
    shutil.copytree(three_sites, root, ignore=shutil.ignore_patterns("privacy-ledger"))
    config = tiny_config.with_overrides(
        data={"sites_dir": str(root)}, train={"max_steps": 1}
    )
    assert config.secure_aggregation.enabled and config.privacy.enabled
    return root, config, build_model(config)


def _ledgers(root: Path) -> dict[str, bytes]:
    """Every byte of every site's privacy ledger."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.glob("*/privacy-ledger/**/*"))
        if p.is_file()
    }


def _node_configs() -> dict[int, dict]:
    return {n: {"partition-id": i, "num-partitions": 3} for i, n in enumerate(NODES)}


def _train_messages(built, server_round: int = 1) -> list[Message]:
    return [
        Message(
            RecordDict(
                {
                    wire.GLOBAL_ADAPTER: to_record(adapter_state(built.model)),
                    wire.CONFIG: ConfigRecord(
                        {
                            wire.SERVER_ROUND: server_round,
                            wire.BASE_FINGERPRINT: built.base_fingerprint,
                            **wire_header(adapter_state(built.model)),
                            **wire_header(adapter_state(built.model)),
                            wire.RUN_ID: "hostile-run",
                        }
                    ),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id=str(server_round),
        )
        for node in NODES
    ]


def _secure_round(federation, tamper: Tamper):
    """One SecAgg+ round of wardround's coordinator, through a hostile grid."""
    _, config, built = federation
    run_config = config.to_flower()
    apps = {node: build_client_app(run_config) for node in NODES}
    grid = HostileGrid(apps, _node_configs(), run_config, tamper=tamper)
    messages = _train_messages(built)
    plan = plan_quantization(config.federation.delta_clip_norm, len(NODES), 40)
    for msg in messages:
        msg.content[wire.CONFIG][wire.SECAGG_MAX_WEIGHT] = plan.max_weight
    return run_secure_train(
        grid,
        messages,
        server_round=1,
        payload_shapes={},
        settings=config.secure_aggregation,
        plan=plan,
        arrays_key=wire.GLOBAL_ADAPTER,
        config_key=wire.CONFIG,
    )


def _call_site(federation, content: RecordDict) -> Message:
    """One train message, crafted by the coordinator, to the first site's ClientApp."""
    _, config, _ = federation
    context = Context(
        run_id=1,
        node_id=NODES[0],
        node_config=_node_configs()[NODES[0]],
        state=RecordDict(),
        run_config=config.to_flower(),
    )
    msg = Message(content, dst_node_id=NODES[0], message_type=MessageType.TRAIN)
    return build_client_app()(msg, context)


def _assert_refused(reply: Message, *fragments: str) -> None:
    assert reply.has_error()
    assert error_kind(reply.error.reason) == REFUSED
    for fragment in fragments:
        assert fragment in reply.error.reason


def test_a_plain_train_message_under_secagg_is_refused_logged_and_spends_nothing(
    federation, caplog
):
    root, _, built = federation
    before = _ledgers(root)
    plain = _train_messages(built)[0].content

    with caplog.at_level(logging.WARNING, "wardround.client.secure_aggregation"):
        reply = _call_site(federation, plain)

    _assert_refused(reply, "not part of Flower's SecAgg+ protocol")
    assert "secure aggregation refused" in caplog.text
    assert _ledgers(root) == before


def test_a_legacy_fitins_outside_the_protocol_is_refused(federation):
    root, _, built = federation
    before = _ledgers(root)
    fit_ins = FitIns(
        parameters=ndarrays_to_parameters(
            [np.asarray(a) for a in adapter_state(built.model).values()]
        ),
        config={
            wire.SERVER_ROUND: 1,
            wire.BASE_FINGERPRINT: built.base_fingerprint,
            wire.RUN_ID: "hostile-run",
            wire.SECAGG_MAX_WEIGHT: 40.0,
        },
    )
    legacy = compat.fitins_to_recorddict(fit_ins, keep_input=True)
    _assert_refused(_call_site(federation, legacy), "not part of Flower's SecAgg+")

    # The same FitIns labelled as the masked-vector stage, with no setup before it.
    forged = compat.fitins_to_recorddict(fit_ins, keep_input=True)
    forged[RECORD_KEY_CONFIGS] = ConfigRecord(
        {
            Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
            Key.CIPHERTEXT_LIST: [],
            Key.SOURCE_LIST: [],
        }
    )
    _assert_refused(_call_site(federation, forged), "with 0 other site(s)")
    assert _ledgers(root) == before


def _set(key: str, value) -> Tamper:
    def change(node: int, msg: Message) -> None:
        msg.content.config_records[RECORD_KEY_CONFIGS][key] = value

    return change


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        (Key.THRESHOLD, 1, "threshold 1 (approved: 2)"),
        (Key.SHARE_NUMBER, 5, "share_num 5 (approved: 3)"),
        (
            Key.CLIPPING_RANGE,
            2 * DEFAULT_DELTA_CLIP_NORM,
            f"clipping_range {2 * DEFAULT_DELTA_CLIP_NORM} "
            f"(approved: {DEFAULT_DELTA_CLIP_NORM})",
        ),
        (Key.TARGET_RANGE, 2**22, "target_range 4194304"),
        (Key.MOD_RANGE, 2**31, "mod_range 2147483648"),
        (Key.MAX_WEIGHT, math.nan, "max_weight nan"),
        (Key.SAMPLE_NUMBER, 2, "announces 2 participant(s)"),
    ],
)
def test_setup_values_other_than_the_approved_ones_are_refused(
    federation, key, value, says
):
    root, _, _ = federation
    before = _ledgers(root)

    result = _secure_round(federation, _at_stage(Stage.SETUP, _set(key, value)))

    assert result.mean_delta is None
    assert set(result.failures) == set(NODES)
    for reason in result.failures.values():
        assert error_kind(reason) == REFUSED
        assert says in reason
    assert _ledgers(root) == before


def _keep_one_other(node: int, msg: Message) -> None:
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    others = sorted(k for k in configs if k not in (Key.STAGE, str(node)))
    for key in others[1:]:
        del configs[key]


def test_two_participants_are_refused_at_share_keys(federation):
    root, _, _ = federation
    before = _ledgers(root)

    result = _secure_round(federation, _at_stage(Stage.SHARE_KEYS, _keep_one_other))

    assert result.mean_delta is None
    for reason in result.failures.values():
        assert error_kind(reason) == REFUSED
        assert "SecAgg+ with 2 participant(s)" in reason
    assert _ledgers(root) == before


def test_a_max_weight_changed_after_setup_is_refused_before_training(federation):
    root, _, _ = federation
    before = _ledgers(root)

    def change(node: int, msg: Message) -> None:
        msg.content.config_records["fitins.config"][wire.SECAGG_MAX_WEIGHT] = 1.0

    result = _secure_round(federation, _at_stage(Stage.COLLECT_MASKED_VECTORS, change))

    assert result.mean_delta is None
    for reason in result.failures.values():
        assert error_kind(reason) == REFUSED
        assert "max weight 1.0" in reason
    assert _ledgers(root) == before


# -- unmask: the sites' own checks, with a minimal handler (no model to train) -------
def _echo_site() -> ClientApp:
    app = ClientApp(
        mods=[error_sanitizing_mod, make_secure_aggregation_mod(lambda m, c: None)]
    )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        res = FitRes(
            Status(Code.OK, "Success"), fit_ins.parameters, 10, {"train-loss": 0.5}
        )
        return Message(compat.fitres_to_recorddict(res, True), reply_to=msg)

    return app


def _echo_round(tamper: Tamper, sites: int = 3):
    nodes = [101 + i for i in range(sites)]
    grid = HostileGrid(
        {n: _echo_site() for n in nodes}, {n: {} for n in nodes}, {}, tamper=tamper
    )
    plan = plan_quantization(1.0, sites, 10)
    shapes = {"w": (4,)}
    messages = [
        Message(
            RecordDict(
                {
                    "arrays": to_record({"w": np.full(4, 0.1, np.float32)}),
                    "config": ConfigRecord({"secagg-max-weight": plan.max_weight}),
                }
            ),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
            group_id="1",
        )
        for n in nodes
    ]
    return run_secure_train(
        grid,
        messages,
        server_round=1,
        payload_shapes=shapes,
        settings=SecureAggregationConfig(),
        plan=plan,
        arrays_key="arrays",
        config_key="config",
    )


def test_the_honest_echo_round_aggregates():
    # The control for the two refusals below: untampered, the same round unmasks.
    result = _echo_round(lambda node, msg: None)
    assert result.failures == {}
    assert np.allclose(result.mean_delta["w"], 0.1, atol=1e-6)


def test_a_node_named_alive_and_dropped_at_unmask_is_refused():
    def name_twice(node: int, msg: Message) -> None:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        alive = list(configs[Key.ACTIVE_NODE_ID_LIST])
        victim = next(n for n in alive if n != node)
        configs[Key.DEAD_NODE_ID_LIST] = [victim]

    result = _echo_round(_at_stage(Stage.UNMASK, name_twice))

    assert result.mean_delta is None
    for reason in result.failures.values():
        assert error_kind(reason) == REFUSED
        assert "both alive and dropped" in reason


def test_an_unmask_leaving_one_live_mask_partner_is_refused():
    def drop_one(node: int, msg: Message) -> None:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        alive = list(configs[Key.ACTIVE_NODE_ID_LIST])
        victim = next(n for n in sorted(alive) if n != node)
        configs[Key.ACTIVE_NODE_ID_LIST] = [n for n in alive if n != victim]
        configs[Key.DEAD_NODE_ID_LIST] = [victim]

    result = _echo_round(_at_stage(Stage.UNMASK, drop_one))

    assert result.mean_delta is None
    for reason in result.failures.values():
        assert error_kind(reason) == REFUSED
        assert "1 of this site's mask partners alive" in reason


class _SetupOnlyGrid:
    """Keeps the setup messages Flower's workflow sends, and answers none."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.sent.extend(messages)
        return []


@pytest.mark.parametrize("sites", [3, 4, 5, 8])
@pytest.mark.parametrize(
    ("num_shares", "threshold"), [(1.0, 0.67), (0.5, 0.6), (5, 3), (1.0, 3)]
)
def test_the_site_recomputes_the_share_counts_flowers_workflow_announces(
    sites, num_shares, threshold
):
    from wardround.common.secagg_math import share_counts

    grid = _SetupOnlyGrid()
    plan = plan_quantization(1.0, sites, 10)
    messages = [
        Message(
            RecordDict({"arrays": to_record({"w": np.zeros(2, np.float32)})}),
            dst_node_id=101 + i,
            message_type=MessageType.TRAIN,
            group_id="1",
        )
        for i in range(sites)
    ]
    settings = SecureAggregationConfig(
        num_shares=num_shares, reconstruction_threshold=threshold
    )
    run_secure_train(
        grid, messages, server_round=1, payload_shapes={}, settings=settings,
        plan=plan, arrays_key="arrays", config_key="config",
    )  # fmt: skip

    announced = grid.sent[0].content.config_records[RECORD_KEY_CONFIGS]
    expected = share_counts(num_shares, threshold, sites)
    assert announced[Key.SAMPLE_NUMBER] == sites
    assert announced[Key.SHARE_NUMBER] == expected.num_shares
    assert announced[Key.THRESHOLD] == expected.threshold


def test_a_refused_setup_quotes_little_of_the_coordinators_values_and_is_thinned(
    monkeypatch, caplog
):
    """Setup messages cost the coordinator nothing: no megabyte warnings, no flood."""
    from wardround.client import secure_aggregation
    from wardround.client.answer_audit import Repeats
    from wardround.common.config import RunConfig
    from wardround.common.errors import SecureAggregationRefused

    monkeypatch.setattr(secure_aggregation, "_refusals_logged", Repeats())
    run = RunConfig().with_overrides(federation={"min_sites": 3})
    reasons = []
    with caplog.at_level(logging.WARNING, logger=secure_aggregation.__name__):
        for i in range(30):
            big = f"{i}" + "A" * 1_000_000
            configs = {
                Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: big,
                Key.THRESHOLD: big, Key.CLIPPING_RANGE: big, Key.TARGET_RANGE: big,
                Key.MOD_RANGE: big, Key.MAX_WEIGHT: big,
            }  # fmt: skip
            message = Message(
                RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}),
                dst_node_id=1,
                message_type=MessageType.TRAIN,
            )
            with pytest.raises(SecureAggregationRefused) as refused:
                secure_aggregation.check_setup(message, run)
            reasons.append(str(refused.value))

    assert max(len(reason) for reason in reasons) < 2_000
    assert "share_num '0AAA" in reasons[0] and "…'" in reasons[0]
    logged = [r for r in caplog.records if "secure aggregation refused" in r.message]
    assert len(logged) == 12  # the first ten, the 20th and the 30th
    assert "(30 times)" in logged[-1].message
