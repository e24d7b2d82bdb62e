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
from wardround.client.replay import MAX_REPLAYS
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

    # Rounds 1 and 2 are trained. Round 1 again is trained anew (the site keeps
    # only its latest answer), which the allowance refuses; round 2 again is the
    # same question (the run is the approved one, whatever the message calls it),
    # so it gets the very answer that already left, at no cost.
    assert [r.has_error() for r in replies] == [False, False, True, False, False]
    assert error_kind(replies[2].error.reason) == "AnswerRefused"
    assert _delta_bytes(replies[3]) == _delta_bytes(replies[1])
    assert _delta_bytes(replies[4]) == _delta_bytes(replies[1])
    assert _delta_bytes(replies[0]) != _delta_bytes(replies[1])
    # One run at the site, whatever the messages called it, and its epsilon stays
    # within what the approved schedule plans.
    key = approved_run_key(approved)
    assert _ledger_runs(site) == Counter({key: APPROVED_ROUNDS})
    spent = site_ledger(site / "privacy-ledger").epsilon(
        approved.privacy.target_delta, Accountant.RDP, key
    )
    assert 0 < spent <= approved.privacy.target_epsilon * (1 + 1e-6)
    events = Counter(e["event"] for e in _audit(site))
    assert events["answer_sent"] == 2 and events["answer_refused"] == 1
    assert events["answer_replayed"] == 2


def _delta_bytes(reply) -> bytes:
    (array,) = reply.content[wire.ADAPTER_DELTA].values()
    return bytes(array.data)


def test_a_repeated_question_gets_the_answer_sent_before_at_no_cost(site, approved):
    coordinator = HostileServerApp(approved, site)
    first = coordinator.ask(MessageType.TRAIN, 1)
    answers_before = (site / "privacy-ledger" / ANSWER_LOG).read_bytes()
    again = coordinator.ask(MessageType.TRAIN, 1, run_id="resumed")

    assert not first.has_error() and not again.has_error()
    assert _delta_bytes(again) == _delta_bytes(first)
    assert dict(again.content[wire.METRICS]) == dict(first.content[wire.METRICS])
    key = approved_run_key(approved)
    assert _ledger_runs(site) == Counter({key: 1})
    assert (site / "privacy-ledger" / ANSWER_LOG).read_bytes() == answers_before

    # Any other adapter is a new question: trained, charged and counted.
    nudged = {name: array.copy() for name, array in coordinator.adapter.items()}
    nudged[next(iter(nudged))].flat[0] += 1e-3
    other = coordinator.ask(MessageType.TRAIN, 1, adapter=nudged)
    assert not other.has_error()
    assert _delta_bytes(other) != _delta_bytes(first)
    assert _ledger_runs(site) == Counter({key: 2})
    assert len(AnswerLog(site / "privacy-ledger" / ANSWER_LOG).entries()) == 2
    # ... and the allowance still ends the run's answers.
    nudged[next(iter(nudged))].flat[0] += 1e-3
    refused = coordinator.ask(MessageType.TRAIN, 1, adapter=nudged)
    assert refused.has_error() and error_kind(refused.error.reason) == "AnswerRefused"
    events = [e["event"] for e in _audit(site)]
    assert events == [
        "answer_sent",
        "answer_replayed",
        "answer_sent",
        "answer_refused",
    ]


def test_a_damaged_kept_answer_is_trained_and_counted_again(site, approved):
    from wardround.client.replay import RELEASES_FOLDER

    coordinator = HostileServerApp(approved, site)
    first = coordinator.ask(MessageType.TRAIN, 1)
    (payload,) = (site / "privacy-ledger" / RELEASES_FOLDER).glob("*/train.npy")
    payload.write_bytes(payload.read_bytes()[:-4] + b"\0\0\0\0")

    again = coordinator.ask(MessageType.TRAIN, 1)
    assert not again.has_error()
    assert _ledger_runs(site) == Counter({approved_run_key(approved): 2})
    assert _delta_bytes(again) != _delta_bytes(first)


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
    distinct = {tuple(sorted(dict(r.content[wire.METRICS]).items())) for r in answered}
    # One evaluation before training, then one a round; after that only the latest
    # question asked again gets its answer again, the very numbers that left, and
    # that at most MAX_REPLAYS times.
    assert len(AnswerLog(site / "privacy-ledger" / ANSWER_LOG).entries()) == 3
    assert len(distinct) <= APPROVED_ROUNDS + 1  # the same adapter each time
    assert len(answered) == APPROVED_ROUNDS + 1 + MAX_REPLAYS
    latest = dict(replies[2].content[wire.METRICS])
    for reply in replies[3:]:
        if not reply.has_error():
            assert dict(reply.content[wire.METRICS]) == latest
    reasons = Counter(
        r.error.reason.split(":")[1][:40] for r in replies if r.has_error()
    )
    assert all(
        error_kind(r.error.reason) == "AnswerRefused" for r in replies if r.has_error()
    )
    assert sum(reasons.values()) == 50 - len(answered) and len(reasons) == 2
    # What left is what the site's policy allows, as coarse as it says.
    decimals = 3
    for reply in answered:
        metrics = reply.content[wire.METRICS]
        assert metrics[wire.NUM_EXAMPLES] % 10 == 0
        for name in (wire.AUROC_MACRO, wire.EVAL_LOSS):
            if name in metrics:
                assert metrics[name] == round(metrics[name], decimals)
    events = Counter(e["event"] for e in _audit(site))
    # 32 refusals past the allowance, 10 past the replays: the first ten of each
    # kind on a line, then the 20th, 30th, ... with their count, so repeating a
    # message cannot fill the site's disk through its audit log
    refused = [e["repeated"] for e in _audit(site) if e["event"] == "answer_refused"]
    replayed = [e["repeated"] for e in _audit(site) if e["event"] == "answer_replayed"]
    assert events["answer_sent"] == 3
    assert sorted(refused) == sorted([*range(1, 11), 20, 30, *range(1, 11)])
    assert replayed == list(range(1, MAX_REPLAYS + 1))
    sent = [e for e in _audit(site) if e["event"] == "answer_sent"]
    assert all(e["numbers"][wire.NUM_EXAMPLES] % 10 == 0 for e in sent)


def test_one_answer_is_sent_again_at_most_max_replays_times(site, approved):
    coordinator = HostileServerApp(approved, site)
    replies = [coordinator.ask(MessageType.TRAIN, 1) for _ in range(MAX_REPLAYS + 2)]

    assert [r.has_error() for r in replies] == [False] * (MAX_REPLAYS + 1) + [True]
    assert len({_delta_bytes(r) for r in replies[:-1]}) == 1
    assert f"again {MAX_REPLAYS} times" in replies[-1].error.reason
    assert _ledger_runs(site) == Counter({approved_run_key(approved): 1})


def test_a_site_that_keeps_its_example_count_home_does_not_answer(site, approved):
    doc = tomllib.loads((site / "site.toml").read_text())
    doc["answers"] = {"metrics": [wire.AUROC_MACRO]}
    (site / "site.toml").write_text(tomli_w.dumps(doc))
    coordinator = HostileServerApp(approved, site)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = coordinator.ask(kind, 1)
        assert reply.has_error() and error_kind(reply.error.reason) == "AnswerRefused"
        assert wire.NUM_EXAMPLES in reply.error.reason
    assert not _ledger_runs(site)
    assert AnswerLog(site / "privacy-ledger" / ANSWER_LOG).entries() == []


def test_a_run_with_more_spares_than_the_site_allows_is_refused_before_any_work(
    site, approved
):
    spares = approved.with_overrides(federation={"repeatable_rounds": 3})
    coordinator = HostileServerApp(spares, site)  # the site allows 2 by default
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = coordinator.ask(kind, 1)
        assert reply.has_error() and error_kind(reply.error.reason) == "AnswerRefused"
        assert "max-repeatable-rounds" in reply.error.reason
    assert not _ledger_runs(site)
    assert AnswerLog(site / "privacy-ledger" / ANSWER_LOG).entries() == []

    # a site that allows 3 (its daemon reads site.toml when it starts)
    generous = site.parent / "generous-hospital"
    shutil.copytree(site, generous)
    doc = tomllib.loads((generous / "site.toml").read_text())
    doc.setdefault("answers", {})["max-repeatable-rounds"] = 3
    (generous / "site.toml").write_text(tomli_w.dumps(doc))
    reply = HostileServerApp(spares, generous).ask(MessageType.TRAIN, 1)
    assert not reply.has_error(), reply.error.reason
    assert _ledger_runs(generous) == Counter({approved_run_key(spares): 1})


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


def test_another_approved_run_never_trains_the_same_bits(site, approved, tmp_path):
    # Without DP a retrained update is the same bits under the same seed; masked,
    # two sums could then tell it apart. A deployed site seeds a round's training
    # with the approved run too.
    plain = approved.with_overrides(privacy={"enabled": False})
    twin = tmp_path / "twin"
    shutil.copytree(site, twin)
    same = [
        HostileServerApp(plain, folder).ask(MessageType.TRAIN, 1)
        for folder in (site, twin)
    ]
    assert _delta_bytes(same[0]) == _delta_bytes(same[1])  # deterministic

    other_run = plain.with_overrides(federation={"rounds": APPROVED_ROUNDS + 1})
    other = HostileServerApp(other_run, site).ask(MessageType.TRAIN, 1)
    assert not other.has_error()
    assert _delta_bytes(other) != _delta_bytes(same[0])


def test_a_crafted_head_learns_nothing_from_a_dp_rounds_metrics(site, approved):
    # A huge head bias would make the mean training loss an exact, un-noised
    # statistic of the sampled patients' labels.
    assert approved.privacy.enabled
    coordinator = HostileServerApp(approved, site)
    crafted = {name: array.copy() for name, array in coordinator.adapter.items()}
    head = [k for k in crafted if ".head." in k]
    assert head
    for name in head:
        crafted[name][...] = 1e4

    reply = coordinator.ask(MessageType.TRAIN, 1, adapter=crafted)

    assert not reply.has_error(), reply.error.reason
    sent = dict(reply.content[wire.METRICS])
    assert not set(sent) & set(wire.OUTSIDE_DP_TRAINING_METRICS)
    assert sent[wire.DP_EPSILON_RUN] > 0  # it was a DP round, and it answered


def test_refusals_naming_a_fresh_round_each_time_are_thinned(site, approved):
    coordinator = HostileServerApp(approved, site)

    replies = [coordinator.ask(MessageType.EVALUATE, 1000 + i) for i in range(60)]

    assert all(reply.has_error() for reply in replies)
    refused = [e for e in _audit(site) if e["event"] == "answer_refused"]
    # ten in full, then the 20th, 30th, ... 60th
    assert [e["repeated"] for e in refused] == [*range(1, 11), 20, 30, 40, 50, 60]
    assert refused[0]["round"] == 1000 and refused[-1]["round"] == 1059
    # another reason is another kind: its first refusal gets its own line
    poisoned = {name: array.copy() for name, array in coordinator.adapter.items()}
    next(iter(poisoned.values())).flat[0] = np.nan
    assert coordinator.ask(MessageType.EVALUATE, 1, adapter=poisoned).has_error()
    last = [e for e in _audit(site) if e["event"] == "answer_refused"][-1]
    assert "non-finite" in last["reason"] and last["repeated"] == 1
