"""A hostile ServerApp under an approved run: every attempt refused at the site.

The site runs as in a deployment (its SuperNode names its ``site.toml``, so no
simulation shortcuts: secure noise on, the run identified by its approved
settings). The coordinator's side is a hand-written ServerApp on an in-process
grid: every message goes through Flower's protobuf encoding to the real site
ClientApp with all its mods. After each attack the test reads what the site wrote
itself: its privacy ledger, its answer log and its audit log.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections import Counter

import numpy as np
import pytest
import tomli_w
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from wardround.client.answers import ANSWER_LOG, AnswerLog
from wardround.client.app import build_client_app
from wardround.client.ledger import site_ledger
from wardround.client.run_identity import approved_run_key
from wardround.common import wire
from wardround.common.adapter import adapter_state, to_record, wire_header
from wardround.common.config import Accountant
from wardround.common.errors import error_kind
from wardround.models import build_model
from wardround.ops.audit import AUDIT_FILENAME, read_audit
from wardround.simulations.local_grid import LocalGrid

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("task_identity")]

NODE = 7
APPROVED_ROUNDS = 2


@pytest.fixture
def site(synthetic_sites, tmp_path):
    """A fresh copy of one synthetic hospital: empty ledger, answers and audit."""
    folder = tmp_path / "hospital"
    shutil.copytree(synthetic_sites / "site-01", folder)
    for state in ("privacy-ledger", ".wardround-site"):
        shutil.rmtree(folder / state, ignore_errors=True)
    doc = tomllib.loads((folder / "site.toml").read_text())
    doc["privacy"]["budget-epsilon"] = 1000.0
    doc["privacy"]["max-epsilon"] = 10.0
    (folder / "site.toml").write_text(tomli_w.dumps(doc))
    return folder


@pytest.fixture
def approved(tiny_config):
    """The run the site approved: DP at epsilon 8, two rounds, plain aggregation."""
    return tiny_config.with_overrides(
        train={"max_steps": 2},
        federation={"rounds": APPROVED_ROUNDS, "min_sites": 1},
        secure_aggregation={"enabled": False},
    )


class HostileServerApp:
    """Sends whatever it likes to one site over an in-process grid."""

    def __init__(self, config, site_folder):
        self.config = config
        run_config = config.to_flower()
        self.grid = LocalGrid(
            {NODE: build_client_app()},
            {NODE: {"site-config": str(site_folder / "site.toml")}},
            run_config,
        )
        self.built = build_model(config)
        self.adapter = adapter_state(self.built.model)

    def ask(self, kind, server_round, run_id="run-1", adapter=None):
        content = RecordDict(
            {
                wire.GLOBAL_ADAPTER: to_record(adapter or self.adapter),
                wire.CONFIG: ConfigRecord(
                    {
                        wire.SERVER_ROUND: server_round,
                        wire.BASE_FINGERPRINT: self.built.base_fingerprint,
                        **wire_header(self.adapter),
                        wire.RUN_ID: run_id,
                    }
                ),
            }
        )
        message = Message(content, dst_node_id=NODE, message_type=kind)
        (reply,) = self.grid.send_and_receive([message])
        return reply


def _audit(site_folder):
    return read_audit(site_folder / ".wardround-site" / AUDIT_FILENAME)


def _ledger_runs(site_folder):
    return Counter(
        run for run, _ in site_ledger(site_folder / "privacy-ledger").recorded()
    )


def test_a_fresh_run_id_every_round_buys_no_fresh_budget(site, approved):
    coordinator = HostileServerApp(approved, site)
    replies = [
        coordinator.ask(MessageType.TRAIN, server_round, run_id=f"run-{attempt}")
        for attempt, server_round in enumerate((1, 2, 1, 2, 2), start=1)
    ]

    answered = [r for r in replies if not r.has_error()]
    assert len(answered) == APPROVED_ROUNDS
    refused = [r for r in replies if r.has_error()]
    assert {error_kind(r.error.reason) for r in refused} == {"AnswerRefused"}
    # One run at the site, whatever the messages called it, and its epsilon stays
    # within what the approved schedule plans.
    key = approved_run_key(approved)
    assert _ledger_runs(site) == Counter({key: APPROVED_ROUNDS})
    spent = site_ledger(site / "privacy-ledger").epsilon(
        approved.privacy.target_delta, Accountant.RDP, key
    )
    assert 0 < spent <= approved.privacy.target_epsilon * (1 + 1e-6)
    events = Counter(e["event"] for e in _audit(site))
    assert events["answer_sent"] == 2 and events["answer_refused"] == 3


def test_rounds_past_the_approved_count_are_refused_before_any_budget(site, approved):
    coordinator = HostileServerApp(approved, site)
    reply = coordinator.ask(MessageType.TRAIN, APPROVED_ROUNDS + 1)

    assert reply.has_error() and error_kind(reply.error.reason) == "AnswerRefused"
    assert "rounds 1..2" in reply.error.reason
    assert not _ledger_runs(site)
    (event,) = [e for e in _audit(site) if e["event"] == "answer_refused"]
    assert event["round"] == APPROVED_ROUNDS + 1


def test_fifty_evaluations_get_one_answer_per_approved_round(site, approved):
    coordinator = HostileServerApp(approved, site)
    replies = [
        coordinator.ask(MessageType.EVALUATE, attempt % (APPROVED_ROUNDS + 1))
        for attempt in range(50)
    ]

    answered = [r for r in replies if not r.has_error()]
    assert len(answered) == APPROVED_ROUNDS + 1  # before training, then one a round
    assert all(
        error_kind(r.error.reason) == "AnswerRefused" for r in replies if r.has_error()
    )
    # What left is what the site's policy allows, as coarse as it says.
    decimals = 3
    for reply in answered:
        metrics = reply.content[wire.METRICS]
        assert metrics[wire.NUM_EXAMPLES] % 10 == 0
        for name in (wire.AUROC_MACRO, wire.EVAL_LOSS):
            if name in metrics:
                assert metrics[name] == round(metrics[name], decimals)
    log = AnswerLog(site / "privacy-ledger" / ANSWER_LOG)
    assert len(log.entries()) == APPROVED_ROUNDS + 1
    events = Counter(e["event"] for e in _audit(site))
    # 47 refusals: the first ten each on a line, then the 20th, 30th and 40th with
    # their count, so repeating a refused message cannot fill the site's disk
    refused = [e["repeated"] for e in _audit(site) if e["event"] == "answer_refused"]
    assert events["answer_sent"] == 3
    assert refused == [*range(1, 11), 20, 30, 40]
    sent = [e for e in _audit(site) if e["event"] == "answer_sent"]
    assert all(e["numbers"][wire.NUM_EXAMPLES] % 10 == 0 for e in sent)


def test_a_non_finite_adapter_is_refused_before_budget_or_answer(site, approved):
    coordinator = HostileServerApp(approved, site)
    poisoned = {name: array.copy() for name, array in coordinator.adapter.items()}
    first = next(iter(poisoned))
    poisoned[first].flat[0] = np.nan

    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = coordinator.ask(kind, 1, adapter=poisoned)
        assert reply.has_error() and error_kind(reply.error.reason) == "FederationError"
        assert "non-finite" in reply.error.reason

    assert not _ledger_runs(site)
    assert AnswerLog(site / "privacy-ledger" / ANSWER_LOG).entries() == []
    assert [e["event"] for e in _audit(site)] == ["answer_refused", "answer_refused"]


def test_secure_noise_cannot_be_turned_off_outside_a_simulation(site, approved):
    insecure = approved.with_overrides(privacy={"secure_mode": "off"})
    reply = HostileServerApp(insecure, site).ask(MessageType.TRAIN, 1)

    assert reply.has_error()
    assert error_kind(reply.error.reason) == "PrivacyPolicyRefused"
    assert "secure noise" in reply.error.reason
    assert not _ledger_runs(site)


def test_the_audit_never_holds_a_tensor_or_text_from_data(site, approved):
    coordinator = HostileServerApp(approved, site)
    coordinator.ask(MessageType.TRAIN, 1)
    coordinator.ask(MessageType.EVALUATE, 1)

    raw = (site / ".wardround-site" / AUDIT_FILENAME).read_text()
    for line in raw.splitlines():
        entry = json.loads(line)
        numbers = entry.get("numbers", {})
        assert all(isinstance(v, (int, float)) for v in numbers.values())
    assert "patient" not in raw.lower()
