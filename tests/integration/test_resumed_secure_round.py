"""A SecAgg+ round asked again, as a coordinator resumed mid-round asks it.

Three deployed sites (each SuperNode names its ``site.toml``: no simulation
shortcuts) answer wardround's SecAgg+ coordinator on an in-process grid; then the
same round is run again with the same global adapter. A masked answer is never
sent again (another sum could leave a partner out and give it away): under DP the
repeat is trained on fresh noise, charged and counted; without DP a retrained
update would be the same bits, so every site refuses to answer the round twice.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from wardround.client.answers import ANSWER_LOG, AnswerLog
from wardround.client.app import build_client_app
from wardround.client.ledger import site_ledger
from wardround.client.replay import RELEASES_FOLDER
from wardround.common import wire
from wardround.common.adapter import adapter_state, to_record, wire_header
from wardround.common.secagg_math import plan_quantization
from wardround.flower_compat.secagg_workflow import run_secure_train
from wardround.models import build_model
from wardround.ops.audit import AUDIT_FILENAME, read_audit
from wardround.simulations.local_grid import LocalGrid

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("task_identity")]

NODES = (2000, 2001, 2002)


@pytest.fixture
def sites(clean_three_sites):
    return clean_three_sites


def _round(config, folders, built, server_round=1):
    run_config = config.to_flower()
    grid = LocalGrid(
        {node: build_client_app() for node in NODES},
        {
            node: {"site-config": str(folder / "site.toml")}
            for node, folder in zip(NODES, folders, strict=True)
        },
        run_config,
    )
    adapter = adapter_state(built.model)
    plan = plan_quantization(config.federation.delta_clip_norm, len(NODES), 40)
    messages = [
        Message(
            RecordDict(
                {
                    wire.GLOBAL_ADAPTER: to_record(adapter),
                    wire.CONFIG: ConfigRecord(
                        {
                            wire.SERVER_ROUND: server_round,
                            wire.BASE_FINGERPRINT: built.base_fingerprint,
                            **wire_header(adapter),
                            wire.RUN_ID: "resumed-run",
                            wire.SECAGG_MAX_WEIGHT: plan.max_weight,
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
    return run_secure_train(
        grid,
        messages,
        server_round=server_round,
        payload_shapes={name: value.shape for name, value in adapter.items()},
        settings=config.secure_aggregation,
        plan=plan,
        arrays_key=wire.GLOBAL_ADAPTER,
        config_key=wire.CONFIG,
    )


def _answers(folder) -> int:
    return len(AnswerLog(folder / "privacy-ledger" / ANSWER_LOG).entries())


def _events(folder) -> list[str]:
    return [
        e["event"]
        for e in read_audit(folder / ".wardround-site" / AUDIT_FILENAME)
        if e["event"].startswith("answer_")
        and e.get("secagg_stage") == "collect_masked_vectors"
    ]


def test_under_dp_a_secure_round_asked_again_is_trained_and_charged_again(
    sites, tiny_config
):
    config = tiny_config.with_overrides(
        train={"max_steps": 1}, federation={"rounds": 2, "min_sites": 3}
    )
    built = build_model(config)
    first = _round(config, sites, built)
    second = _round(config, sites, built)

    assert first.mean_delta is not None and second.mean_delta is not None
    assert [_answers(f) for f in sites] == [2, 2, 2]
    assert all(len(site_ledger(f / "privacy-ledger").recorded()) == 2 for f in sites)
    assert all(_events(f) == ["answer_sent", "answer_sent"] for f in sites)
    assert not any((f / "privacy-ledger" / RELEASES_FOLDER).exists() for f in sites)
    # fresh noise: the two means differ by far more than quantization
    difference = max(
        float(np.abs(second.mean_delta[name] - value).max())
        for name, value in first.mean_delta.items()
    )
    assert difference > 1e-3


def test_without_dp_a_secure_round_is_answered_once(sites, tiny_config):
    config = tiny_config.with_overrides(
        train={"max_steps": 1},
        federation={"rounds": 2, "min_sites": 3},
        privacy={"enabled": False},
    )
    built = build_model(config)
    first = _round(config, sites, built)
    second = _round(config, sites, built)

    assert first.mean_delta is not None and second.mean_delta is None
    assert [_answers(f) for f in sites] == [1, 1, 1]
    assert all("answers such a round once" in why for why in second.failures.values())
    assert all(_events(f) == ["answer_sent", "answer_refused"] for f in sites)


@pytest.mark.parametrize("repeatable", [0, 1])
def test_a_repeatable_round_lets_a_resumed_dp_run_reach_its_last_round(
    sites, tiny_config, repeatable
):
    config = tiny_config.with_overrides(
        train={"max_steps": 1},
        federation={"rounds": 2, "min_sites": 3, "repeatable_rounds": repeatable},
    )
    built = build_model(config)
    first = _round(config, sites, built, server_round=1)
    repeated = _round(config, sites, built, server_round=1)
    last = _round(config, sites, built, server_round=2)

    assert first.mean_delta is not None and repeated.mean_delta is not None
    if repeatable:
        # planned for three releases: the repeat fits in the run's epsilon
        assert last.mean_delta is not None and not last.failures
        assert [_answers(f) for f in sites] == [3, 3, 3]
        key = site_ledger(sites[0] / "privacy-ledger").recorded()[0][0]
        for folder in sites:
            spent = site_ledger(folder / "privacy-ledger").epsilon(
                config.privacy.target_delta, config.privacy.accountant, key
            )
            assert 0 < spent <= config.privacy.target_epsilon * (1 + 1e-6)
    else:
        assert last.mean_delta is None
        assert [_answers(f) for f in sites] == [2, 2, 2]
