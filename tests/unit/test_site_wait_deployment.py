"""The coordinator's deployment mode: sites named from sites.json, the audit log.

Real site ClientApps on an in-process grid, with tiny timeouts.
"""

import json

import pytest
from site_wait_helpers import FAST, FakeLog
from site_wait_helpers import late as _late
from site_wait_helpers import local_grid as _grid

from wardround.common import wire
from wardround.common.errors import FederationError
from wardround.ops.audit import read_audit, verify_audit
from wardround.server.deployment import (
    AuditObserver,
    Deployment,
    SiteRoster,
    deployment_from_env,
)
from wardround.server.federation import run_federation
from wardround.server.observers import ObserverGroup


@pytest.fixture(scope="module")
def config(synthetic_sites, tiny_config):
    return tiny_config.with_overrides(
        data={"sites_dir": str(synthetic_sites)},
        train={"max_steps": 1},
        federation={"rounds": 1, "min_sites": 2, **FAST},
        privacy={"enabled": False},
        secure_aggregation={"enabled": False},
    )


# -- deployment mode: sites.json names, the audit log --------------------------
def _write_sites(state, rows):
    (state / "sites.json").write_text(json.dumps({"sites": rows}))


def _site(node_id, revoked=False):
    return {
        "node_id": node_id,
        "public_key_sha256": "ab" * 32,
        "enrolled_at": "2025-01-01T00:00:00+00:00",
        "revoked_at": "2025-02-01T00:00:00+00:00" if revoked else None,
    }


def test_the_roster_names_enrolled_sites_and_expects_those_not_revoked(tmp_path):
    _write_sites(
        tmp_path,
        {"st-aurelia": _site(1000), "st-brendan": _site(1001), "old": _site(7, True)},
    )
    roster = SiteRoster(tmp_path / "sites.json")
    assert roster.name(1000, -1) == "st-aurelia"
    assert roster.name(1001, 0) == "st-brendan"  # the index does not matter
    assert roster.name(4242, 1) == "node-4242"
    assert roster.expected_nodes() == [1000, 1001]
    _write_sites(tmp_path, {"st-aurelia": _site(1000), "st-cuthbert": _site(4242)})
    assert roster.name(4242, -1) == "st-cuthbert"  # re-read when the file changes
    assert SiteRoster(tmp_path / "none.json").expected_nodes() == []


def test_deployment_mode_needs_the_state_folder(tmp_path):
    assert deployment_from_env({}) is None
    assert (
        deployment_from_env({"WARDROUND_COORDINATOR_STATE": str(tmp_path / "no")})
        is None
    )
    found = deployment_from_env({"WARDROUND_COORDINATOR_STATE": str(tmp_path)})
    assert isinstance(found, Deployment) and found.state_dir == tmp_path


# Every field each event may carry: operational facts only, never patient data.
ALLOWED_FIELDS = {
    "run_started": {
        "run_id",
        "rounds",
        "strategy",
        "dp",
        "target_epsilon",
        "secagg",
        "expected_sites",
        "resumed_from_round",
    },
    "site_joined": {"run_id", "round", "site"},
    "round_started": {"run_id", "round", "sites_sampled"},
    "round_finished": {
        "run_id",
        "round",
        "sites",
        "bytes_by_site",
        "epsilon_by_site",
        "global_auroc",
        "seconds",
    },
    "site_left": {"run_id", "round", "site", "phase", "kind", "reason"},
    "site_refused": {"run_id", "round", "site", "phase", "kind", "reason"},
    "round_repeated": {"run_id", "round", "phase", "sites_gone"},
    "run_paused": {"run_id", "round", "reason"},
    "run_resumed": {"run_id", "round"},
    "run_finished": {"run_id", "round"},
    "run_stopped": {"run_id", "round", "state", "reason"},
}
LINE_FIELDS = {"seq", "time", "actor", "event", "prev", "hmac"}


def _deployed_run(three_sites, tiny_config, tmp_path, monkeypatch):
    """Three enrolled sites (a fourth revoked) in a 2-round deployed run; the run's
    result and the coordinator's state folder. One site is late before round 0,
    st-cuthbert goes silent in round 2's training."""
    from flwr.app import Context, RecordDict

    from wardround.flower_compat.pacing import serverapp_grid_module
    from wardround.server.app import build_server_app

    # The deployed ServerApp paces Flower's Grid for good; this test puts it back.
    http_grid = serverapp_grid_module()
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    state = tmp_path / "state"
    state.mkdir()
    _write_sites(
        state,
        {
            "st-aurelia": _site(1000),
            "st-brendan": _site(1001),
            "st-cuthbert": _site(1002),
            "st-dunstan": _site(1003, revoked=True),
        },
    )
    monkeypatch.setenv("WARDROUND_COORDINATOR_STATE", str(state))
    config = tiny_config.with_overrides(
        data={"sites_dir": str(three_sites)},
        train={"max_steps": 1},
        federation={"rounds": 2, "min_sites": 2, **FAST},
        privacy={"enabled": False},
        secure_aggregation={"enabled": False},
        output={"dir": str(tmp_path / "runs" / "20250101-abcdef")},
    )

    def silent(node, msg):
        return (
            node == 1002
            and msg.metadata.message_type == "train"
            and (msg.content[wire.CONFIG][wire.SERVER_ROUND] == 2)
        )

    grid = _grid(config, sites=3, vanish=silent)
    _late(grid, present=1, calls=2)  # the run pauses once before round 0
    results = []
    app = build_server_app(config.to_flower(), results=results)
    app(
        grid,
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
    )
    [result] = results
    return result, state


def test_a_deployed_run_names_sites_from_sites_json_and_audits_the_run(
    three_sites, tiny_config, tmp_path, monkeypatch
):
    result, state = _deployed_run(three_sites, tiny_config, tmp_path, monkeypatch)

    assert result.summary["run_id"] == "20250101-abcdef"  # the launcher's run name
    assert {t.site for t in result.rounds[1].train} == {
        "st-aurelia",
        "st-brendan",
        "st-cuthbert",
    }
    audit = state / "audit.jsonl"
    assert verify_audit(audit).ok
    lines = read_audit(audit)
    assert {line["actor"] for line in lines} == {"coordinator"}
    for line in lines:
        fields = set(line) - LINE_FIELDS
        assert fields <= ALLOWED_FIELDS[line["event"]], line["event"]
        assert line["run_id"] == "20250101-abcdef"
    events = [line["event"] for line in lines]
    assert events == [
        "run_started",
        "run_paused",
        "run_resumed",
        "site_joined",
        "site_joined",
        "site_joined",
        "round_started",
        "round_finished",
        "round_started",
        "site_left",
        "round_finished",
        "run_finished",
    ]
    started = lines[0]
    assert started["expected_sites"] == 3  # enrolled and not revoked
    assert (started["dp"], started["secagg"], started["target_epsilon"]) == (
        False,
        False,
        None,
    )
    finished_1 = lines[7]
    assert finished_1["sites"] == ["st-aurelia", "st-brendan", "st-cuthbert"]
    assert set(finished_1["bytes_by_site"]) == set(finished_1["sites"])
    assert all(b > 0 for b in finished_1["bytes_by_site"].values())
    assert finished_1["epsilon_by_site"] == {}
    left = lines[9]
    assert (left["site"], left["round"], left["phase"], left["kind"]) == (
        "st-cuthbert",
        2,
        "train",
        None,
    )
    assert left["reason"].startswith("no reply within federation.round-timeout-s")
    assert lines[10]["sites"] == ["st-aurelia", "st-brendan"]


def test_the_audit_observer_records_refusals_privacy_and_stops():
    from wardround.server.observers import RunInfo
    from wardround.server.records import (
        PrivacySpend,
        RoundRecord,
        SiteFailure,
        SiteTrainReport,
    )

    fake = FakeLog()
    observer = AuditObserver(fake, lambda node, index: f"site-{node}")
    group = ObserverGroup(observer)
    from wardround.common.config import RunConfig

    group.on_run_started(RunInfo("run-1", 5, 2, 3, RunConfig()))
    spend = PrivacySpend(1.5, 1.4, 2.0, 1e-5, 1.1, 0.1, 10, 1.0)
    group.on_round(
        RoundRecord(
            round=4,
            train=[
                SiteTrainReport(1, "site-1", 10, 0.5, 10, 1.0, 0.2, 999, privacy=spend)
            ],
            evaluate=[],
            failures=[
                SiteFailure(
                    2,
                    "train",
                    "[PrivacyBudgetExhausted] privacy budget exhausted: run 8.0 > 4.0\n"
                    "with a {weird} second line",
                    "PrivacyBudgetExhausted",
                )
            ],
            global_auroc=float("nan"),
            global_loss=0.5,
            train_loss=0.5,
            adapter_sha256="0" * 64,
            seconds=1.23456,
            aggregation_seconds=0.0,
        )
    )
    group.on_finished("stopped", "round 5: 1 site(s) trained, the run needs 2")
    [started, refused, finished, stopped] = fake.lines
    assert started == (
        "run_started",
        {
            "run_id": "run-1",
            "rounds": 5,
            "strategy": "fedavg",
            "dp": True,
            "target_epsilon": 8.0,
            "secagg": True,
            "expected_sites": 2,
            "resumed_from_round": 3,
        },
    )
    assert refused[0] == "site_refused" and refused[1]["site"] == "site-2"
    assert "{" not in refused[1]["reason"] and "\n" not in refused[1]["reason"]
    assert finished[1]["epsilon_by_site"] == {"site-1": 1.5}
    assert finished[1]["global_auroc"] is None and finished[1]["seconds"] == 1.235
    assert stopped[0] == "run_stopped" and stopped[1]["state"] == "stopped"


def test_too_few_replies_stop_the_run_with_its_status_and_audit(config, tmp_path):
    def silent(node, msg):
        return node == 1001 and msg.metadata.message_type == "train"

    config = config.with_overrides(federation={"round_retries": 0})
    run_dir = tmp_path / "run"
    audit = FakeLog()
    _write_sites(tmp_path, {"st-aurelia": _site(1000), "st-brendan": _site(1001)})
    deployment = Deployment.open(tmp_path, recorder=audit)
    with pytest.raises(FederationError, match="1 site\\(s\\) trained"):
        run_federation(
            _grid(config, vanish=silent),
            config,
            run_dir=run_dir,
            site_names=deployment.roster.name,
            observer=deployment.observer,
        )
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and "1 site(s) trained" in status["reason"]
    assert json.loads((run_dir / "run.json").read_text())["rounds_completed"] == 0
    # the round left no record, but the audit says who failed in it
    events = [event for event, _ in audit.lines]
    assert events[-2:] == ["site_left", "run_stopped"]
    left, stopped = audit.lines[-2][1], audit.lines[-1][1]
    assert (left["site"], left["round"], left["phase"]) == ("st-brendan", 1, "train")
    assert stopped["state"] == "stopped" and "1 site(s) trained" in stopped["reason"]


# -- a site that goes away mid-round: the round is asked again -------------------
def _comes_back(grid):
    """A vanished site restarts: it is connected again when the run next looks."""
    real = grid.get_node_ids

    def get_node_ids():
        grid.dead.clear()
        return real()

    grid.get_node_ids = get_node_ids


def _goes_away(node_id, message_type, times):
    """``node_id`` dies on its first ``times`` messages of ``message_type``."""
    left = {"n": times}

    def rule(node, msg):
        if node != node_id or msg.metadata.message_type != message_type:
            return False
        left["n"] -= 1
        return left["n"] >= 0

    return rule


def _two_enrolled(tmp_path):
    audit = FakeLog()
    _write_sites(tmp_path, {"st-aurelia": _site(1000), "st-brendan": _site(1001)})
    return audit, Deployment.open(tmp_path, recorder=audit)


@pytest.mark.parametrize("phase", ["train", "evaluate"])
def test_a_round_short_of_a_site_that_went_away_is_asked_again_once_it_is_back(
    config, tmp_path, phase
):
    audit, deployment = _two_enrolled(tmp_path)
    grid = _grid(config, vanish=_goes_away(1001, phase, times=1))
    _comes_back(grid)
    result = run_federation(
        grid,
        config,
        run_dir=tmp_path / "run",
        site_names=deployment.roster.name,
        observer=deployment.observer,
    )
    # st-brendan went away in round 0's evaluation or round 1's training
    short = result.rounds[0 if phase == "evaluate" else 1]
    assert len(result.rounds) == 2  # round 0 and the run's one round
    assert {e.site for e in short.evaluate} == {"st-aurelia", "st-brendan"}
    if phase == "train":
        assert {t.site for t in short.train} == {"st-aurelia", "st-brendan"}
    [again] = short.extra["asked_again"]
    assert again["phase"] == phase
    [gone] = again["failures"]
    assert (gone["node_id"], gone["went_away"]) == (1001, True)
    assert short.failures == []  # the last ask had every site
    repeated = [f for e, f in audit.lines if e == "round_repeated"]
    assert repeated == [
        {
            "run_id": result.summary["run_id"],
            "round": short.round,
            "phase": phase,
            "sites_gone": ["st-brendan"],
        }
    ]
    left = [f for e, f in audit.lines if e == "site_left"]
    assert [(f["site"], f["phase"]) for f in left] == [("st-brendan", phase)]
    assert [e for e, _ in audit.lines][-1] == "run_finished"
    written = json.loads(
        (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[short.round]
    )
    assert written["extra"]["asked_again"][0]["phase"] == phase


def test_a_round_is_asked_again_at_most_round_retries_times(config, tmp_path):
    audit, deployment = _two_enrolled(tmp_path)
    config = config.with_overrides(federation={"round_retries": 2})
    grid = _grid(config, vanish=_goes_away(1001, "train", times=3))
    _comes_back(grid)
    with pytest.raises(FederationError, match="asked 3 times") as stopped:
        run_federation(
            grid,
            config,
            run_dir=tmp_path / "run",
            site_names=deployment.roster.name,
            observer=deployment.observer,
        )
    assert "round-retries" in stopped.value.hint
    events = [e for e, _ in audit.lines]
    assert events.count("round_repeated") == 2
    assert events[-2:] == ["site_left", "run_stopped"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "stopped" and "asked 3 times" in status["reason"]


def test_a_round_is_asked_again_only_where_sites_went_away_and_can_make_it(config):
    """Asking again helps only sites that went away, where they can reach min-sites."""
    from wardround.server.records import SiteFailure
    from wardround.server.retries import RoundRetries
    from wardround.server.strategies.secagg_plus import SECURE_MEAN_OUT_OF_BOUND

    three = config.with_overrides(federation={"min_sites": 3})
    retries = RoundRetries(three)
    refused = SiteFailure(1001, "train", "[AnswerRefused] ...", "AnswerRefused")
    gone = SiteFailure(1002, "train", "no reply", went_away=True)
    assert retries.why_not("train", [refused], answered=2, asked=1) == ""
    assert retries.why_not("train", [gone], answered=2, asked=1) is None
    # 1 answered, 1 refused, 1 gone: even back, it makes 2 of the 3 needed
    hopeless = retries.why_not("train", [refused, gone], answered=1, asked=1)
    assert "cannot reach federation.min-sites=3" in hopeless
    assert "round-retries = 2" in retries.why_not("train", [gone], 2, asked=3)
    # a secure mean beyond its bound: the site that skipped its clip would again
    beyond = SiteFailure(1000, "train", "beyond", SECURE_MEAN_OUT_OF_BOUND)
    assert retries.why_not("train", [beyond, gone], answered=2, asked=1) == ""
    # a simulation's sites never go away: a late one is still working
    simulated = RoundRetries(three, enabled=False)
    assert simulated.why_not("train", [gone], answered=2, asked=1) == ""


def test_under_secagg_a_training_round_is_asked_again_only_within_repeatable_rounds(
    config,
):
    """A masked answer is never sent again: a repeat is a new, counted release."""
    from wardround.server.records import SiteFailure
    from wardround.server.retries import RoundRetries

    gone = [SiteFailure(1001, "train", "left the protocol", went_away=True)]
    secure = config.with_overrides(
        federation={"min_sites": 3}, secure_aggregation={"enabled": True}
    )
    assert "repeatable-rounds (0)" in RoundRetries(secure).why_not("train", gone, 2, 1)
    # evaluation answers travel in the clear: asked again all the same
    assert RoundRetries(secure).why_not("evaluate", gone, 2, 1) is None
    two_spare = secure.with_overrides(
        federation={"repeatable_rounds": 2}, privacy={"enabled": True}
    )
    retries = RoundRetries(two_spare)
    assert retries.why_not("train", gone, 2, 1) is None
    retries.note("train", gone)
    assert retries.why_not("train", gone, 2, 2) is None
    retries.note("train", gone)
    retries.start_round()  # a later round: its first ask
    assert "all used" in retries.why_not("train", gone, 2, 1)
    # a resumed run counts the repeats its records hold, and the round it resumes
    asked = {"asked_again": [{"phase": "train"}, {"phase": "evaluate"}]}
    records = [_record(0, {}), _record(1, asked)]
    resumed = RoundRetries.resuming(two_spare, records, enabled=True)
    assert resumed.secure_repeats_used == 2
    assert "all used" in resumed.why_not("train", gone, 2, 1)


def _record(server_round, extra):
    from wardround.server.records import RoundRecord

    return RoundRecord(
        round=server_round,
        train=[],
        evaluate=[],
        failures=[],
        global_auroc=0.5,
        global_loss=1.0,
        train_loss=1.0,
        adapter_sha256="0" * 64,
        seconds=1.0,
        aggregation_seconds=0.0,
        extra=extra,
    )


def test_a_simulation_does_not_ask_a_short_round_again(config, tmp_path, monkeypatch):
    """In a simulation no site goes away: a late one is still working on the round."""
    from flwr.app import Context, RecordDict

    from wardround.server.app import build_server_app

    monkeypatch.delenv("WARDROUND_COORDINATOR_STATE", raising=False)
    config = config.with_overrides(output={"dir": str(tmp_path / "run")})
    grid = _grid(config, vanish=_goes_away(1001, "train", times=1))
    _comes_back(grid)  # asked again, it would answer
    app = build_server_app(config.to_flower(), results=[])
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
    with pytest.raises(FederationError, match="1 site\\(s\\) trained"):
        app(grid, context)
    rounds = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 1  # round 0 only
