"""A site's privacy floor and budget win over whatever a run asks for."""

import shutil
import tomllib

import numpy as np
import pytest
import tomli_w
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from wardround.client.app import build_client_app, handle_train
from wardround.client.ledger import PrivacyLedger, ledger_file
from wardround.client.run_identity import approved_run_key
from wardround.common import wire
from wardround.common.adapter import adapter_state, to_record, wire_header
from wardround.common.config import Accountant, RunConfig
from wardround.common.errors import (
    PrivacyBudgetExhausted,
    PrivacyPolicyRefused,
    error_kind,
)
from wardround.common.privacy import Mechanism
from wardround.models import build_model

pytestmark = pytest.mark.usefixtures("task_identity")


def _site(synthetic_sites, tmp_path, **privacy):
    folder = tmp_path / "site"
    shutil.copytree(synthetic_sites / "site-01", folder)
    shutil.rmtree(folder / "privacy-ledger", ignore_errors=True)
    doc = tomllib.loads((folder / "site.toml").read_text())
    doc["privacy"].update({k.replace("_", "-"): v for k, v in privacy.items()})
    (folder / "site.toml").write_text(tomli_w.dumps(doc))
    return folder / "site.toml"


def _call(config, site_toml, run_id="run-1", server_round=1):
    # Plain train messages, which a run under SecAgg+ would refuse.
    config = config.with_overrides(secure_aggregation={"enabled": False})
    built = build_model(config)
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"site-config": str(site_toml)},
        state=RecordDict(),
        run_config=config.to_flower(),
    )
    content = RecordDict(
        {
            wire.GLOBAL_ADAPTER: to_record(adapter_state(built.model)),
            wire.CONFIG: ConfigRecord(
                {
                    wire.SERVER_ROUND: server_round,
                    wire.BASE_FINGERPRINT: built.base_fingerprint,
                    **wire_header(adapter_state(built.model)),
                    wire.RUN_ID: run_id,
                }
            ),
        }
    )
    msg = Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN)
    return msg, context, built


@pytest.mark.parametrize(
    ("privacy", "overrides", "reason"),
    [
        ({"max_epsilon": 4.0}, {"target_epsilon": 8.0}, "at most 4 per run"),
        ({"max_delta": 1e-6}, {"target_delta": 1e-5}, "privacy.max-delta"),
        ({"min_noise_multiplier": 5.0}, {}, "below this site's minimum 5"),
        ({"required": True}, {"enabled": False}, "requires DP-SGD"),
    ],
)
def test_the_site_floor_beats_the_run_config(
    synthetic_sites, tiny_config, tmp_path, privacy, overrides, reason
):
    site_toml = _site(synthetic_sites, tmp_path, **privacy)
    config = tiny_config.with_overrides(privacy=overrides, train={"max_steps": 1})
    msg, context, _ = _call(config, site_toml)
    with pytest.raises(PrivacyPolicyRefused, match=reason):
        handle_train(msg, context)
    # nothing was spent: the refusal comes before the ledger
    assert not list((site_toml.parent / "privacy-ledger").glob("*.jsonl")) or not (
        PrivacyLedger(
            next((site_toml.parent / "privacy-ledger").glob("*.jsonl"))
        ).history()
    )


def test_a_round_past_the_budget_is_refused_and_the_refusal_leaves_as_a_status(
    synthetic_sites, tiny_config, tmp_path
):
    site_toml = _site(synthetic_sites, tmp_path, max_epsilon=8.0, budget_epsilon=9.0)
    config = tiny_config.with_overrides(train={"max_steps": 2})
    msg, context, built = _call(config, site_toml, run_id="new-run")
    # an earlier run already spent most of this site's lifetime budget
    ledger = PrivacyLedger(ledger_file(site_toml.parent / "privacy-ledger"))
    entry = ledger.reserve(
        "old-run", 1, Mechanism(0.7, 0.25, 60), delta=1e-5, max_grad_norm=1.0,
        accountant="rdp", base_model=built.base_fingerprint,
    )  # fmt: skip
    ledger.commit(entry, 60, epsilon_run=0.0, epsilon_total=0.0)
    assert ledger.epsilon(1e-5, Accountant.RDP) > 8.5
    before = ledger.path.read_bytes()
    with pytest.raises(PrivacyBudgetExhausted, match="lifetime budget"):
        handle_train(msg, context)
    assert ledger.path.read_bytes() == before  # no reservation for a refused round

    # Through the ClientApp, the refusal is an error reply the coordinator can read.
    reply = build_client_app()(msg, context)
    assert reply.has_error()
    assert error_kind(reply.error.reason) == "PrivacyBudgetExhausted"


def test_a_dp_round_is_ledgered_before_its_delta_leaves(
    synthetic_sites, tiny_config, tmp_path
):
    site_toml = _site(synthetic_sites, tmp_path)
    config = tiny_config.with_overrides(train={"max_steps": 3})
    msg, context, built = _call(config, site_toml)
    reply = handle_train(msg, context)
    metrics = reply.content[wire.METRICS]
    ledger = PrivacyLedger(ledger_file(site_toml.parent / "privacy-ledger"))
    kinds = [e["kind"] for e in ledger.entries()]
    assert kinds == ["reserve", "commit"]
    assert metrics[wire.DP_STEPS] == 3
    assert metrics[wire.DP_EPSILON_RUN] == pytest.approx(
        ledger.epsilon(
            1e-5,
            Accountant.RDP,
            approved_run_key(RunConfig.from_flower(dict(context.run_config))),
        )
    )
    assert 0 < metrics[wire.DP_EPSILON_RUN] < config.privacy.target_epsilon
    assert np.isfinite(metrics[wire.DP_EPSILON_RUN_PRV])
    # the delta is clipped to the run's bound
    delta = reply.content[wire.ADAPTER_DELTA]
    norm = np.sqrt(
        sum(
            float(np.sum(delta[k].numpy().astype(np.float64) ** 2))
            for k in delta.keys()
        )
    )
    assert norm <= config.federation.delta_clip_norm + 1e-6


@pytest.mark.parametrize("private", [False, True])
def test_a_site_that_clips_its_delta_says_so_and_sends_the_bound(
    synthetic_sites, tiny_config, tmp_path, caplog, private
):
    site_toml = _site(synthetic_sites, tmp_path)
    bound = 1e-4  # below any trained delta's norm
    config = tiny_config.with_overrides(
        train={"max_steps": 3},
        federation={"delta_clip_norm": bound},
        privacy={"enabled": private},
    )
    msg, context, _ = _call(config, site_toml)
    with caplog.at_level("INFO", logger="wardround.client.app"):
        reply = handle_train(msg, context)
    metrics = reply.content[wire.METRICS]
    assert metrics[wire.DELTA_CLIPPED] == 1
    assert metrics[wire.DELTA_L2] > bound
    (array,) = (v.numpy() for v in reply.content[wire.ADAPTER_DELTA].values())
    assert float(np.linalg.norm(array.astype(np.float64))) <= bound * (1 + 1e-5)
    (record,) = [r for r in caplog.records if "delta-clip-norm" in r.getMessage()]
    assert "round 1" in record.getMessage() and f"= {bound:g}" in record.getMessage()
    # a DP-SGD delta is mostly noise: the bound limiting it is expected, not a fault
    assert record.levelname == ("INFO" if private else "WARNING")


def test_a_tiny_epsilon_is_computed_without_opacus_asking_for_more_orders():
    """Opacus warns when its largest order is the best one; the ledger keeps its orders."""
    import warnings

    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from wardround.common.privacy import _rdp_epsilon

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = np.asarray(compute_rdp(q=0.01, noise_multiplier=50.0, steps=1, orders=orders))
    with pytest.warns(UserWarning, match="Optimal order is the largest alpha"):
        expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rdp_epsilon(((50.0, 0.01, 1),), 1e-5) == float(expected)
