"""A SecAgg+ round asked again, as a coordinator resumed mid-round asks it.

Three deployed sites (each SuperNode names its ``site.toml``: no simulation
shortcuts) answer wardround's SecAgg+ coordinator on an in-process grid; then the
same round is run again with the same global adapter. Under DP each site sends
its kept answer again: nothing trained, no ledger line, no answer counted, and
the second round's mean is the first one's within SecAgg+'s quantization. Without
DP the masks are a delta's only protection, so the repeat is trained and counted.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from wardround.client.answers import ANSWER_LOG, AnswerLog
from wardround.client.app import build_client_app
from wardround.client.ledger import site_ledger
from wardround.common import wire
from wardround.common.adapter import adapter_state, to_record, wire_header
from wardround.common.secagg_math import mean_error_bound, plan_quantization
from wardround.flower_compat.secagg_workflow import run_secure_train
from wardround.models import build_model
from wardround.ops.audit import AUDIT_FILENAME, read_audit
from wardround.simulations.local_grid import LocalGrid

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("task_identity")]

NODES = (2000, 2001, 2002)


@pytest.fixture
def sites(three_sites, tmp_path):
    root = tmp_path / "sites"
    shutil.copytree(
        three_sites,
        root,
        ignore=shutil.ignore_patterns("privacy-ledger", ".wardround-site"),
    )
    return sorted(p for p in root.iterdir() if (p / "site.toml").is_file())


def _round(config, folders, built):
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
                            wire.SERVER_ROUND: 1,
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
            group_id="1",
        )
        for node in NODES
    ]
    return run_secure_train(
        grid,
        messages,
        server_round=1,
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


@pytest.mark.parametrize("private", [True, False], ids=["dp", "no-dp"])
def test_a_secure_round_asked_again(sites, tiny_config, private):
    config = tiny_config.with_overrides(
        train={"max_steps": 1},
        federation={"rounds": 2, "min_sites": 3},
        privacy={"enabled": private},
    )
    built = build_model(config)
    first = _round(config, sites, built)
    ledgers = [site_ledger(f / "privacy-ledger").entries() for f in sites]
    second = _round(config, sites, built)

    assert first.mean_delta is not None and second.mean_delta is not None
    assert not first.failures and not second.failures
    if private:
        assert [_answers(f) for f in sites] == [1, 1, 1]
        assert [site_ledger(f / "privacy-ledger").entries() for f in sites] == ledgers
        assert all(_events(f) == ["answer_sent", "answer_replayed"] for f in sites)
        # The same three deltas under new masks: the same mean, up to SecAgg+'s
        # stochastic quantization.
        plan = plan_quantization(config.federation.delta_clip_norm, len(NODES), 40)
        bound = mean_error_bound(
            plan, len(NODES), config.federation.delta_clip_norm, first.weight_sum
        )
        for name, value in first.mean_delta.items():
            np.testing.assert_allclose(second.mean_delta[name], value, atol=2 * bound)
    else:
        assert [_answers(f) for f in sites] == [2, 2, 2]
        assert all(_events(f) == ["answer_sent", "answer_sent"] for f in sites)
