"""Deployment on loopback: a coordinator and three site daemons with TLS and site keys.

One federation serves the whole module (starting it costs ~30 s): runs with DP and
SecAgg+, refusals (unapproved app, unenrolled or revoked key, a certificate from
another CA), a site killed mid-run, and the coordinator killed and resumed. Every
process is started through the ``wardround`` CLI and stopped by PID.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from wardround.client.answers import ANSWER_LOG, AnswerLog
from wardround.deploy.loopback import (
    WARDROUND,
    LoopbackFederation,
    read_jsonl,
    wait_for,
)
from wardround.ops.audit import read_audit, verify_audit
from wardround.pki import generate_site_keypair, init_ca
from wardround.sitedata.site_config import SiteConfig

pytestmark = pytest.mark.deploy

# The first message a site gets loads its data and model: minutes on a loaded 2-core
# machine, and sites reconnect to a restarted coordinator with a backoff of seconds.
# The killed-site test keeps short timeouts: they decide how soon the round goes on.
FAST_RUN = """
[federation]
rounds = {rounds}
min-sites = {min_sites}
round-timeout-s = {timeout}
join-timeout-s = 20
seed = {seed}
[secure-aggregation]
enabled = {secure}
stage-timeout-s = {stage_timeout}
[model]
image-size = 32
max-note-tokens = 32
base = "random"
[train]
batch-size = 8
"""

ALL_SITES_SECURE = {"min_sites": 3, "secure": "true"}
# A round of 2 left from 3 cannot be secure-aggregated (sites refuse SecAgg+ among
# fewer than 3; tests/integration/test_secure_rounds.py): this run aggregates plainly.
ONE_MAY_DROP = {"min_sites": 2, "secure": "false"}
ALL_SITES_PLAIN = {"min_sites": 3, "secure": "false"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    fed = LoopbackFederation.create(tmp_path_factory.mktemp("loopback"))
    try:
        fed.start_coordinator()
        for name in fed.site_names:
            result = fed.enrol(name)
            assert result.returncode == 0, result.stderr
        for name in fed.site_names:
            fed.start_site(name)
        fed.wait_online(fed.site_names)
        yield fed
    finally:
        stopped = fed.stop_all()
        assert all(
            not d.family() or d.proc.poll() is not None for d in fed.daemons.values()
        )
        assert stopped or not fed.daemons


def _launch(
    fed: LoopbackFederation, run_toml: Path, *extra: str, timeout_s: float = 600
):
    return fed.cli(
        "launch",
        "--config",
        str(run_toml),
        "--coordinator",
        str(fed.coordinator_toml),
        "--out",
        str(fed.root / "out" / run_toml.stem),
        *extra,
        timeout_s=timeout_s,
    )


def test_a_run_with_dp_and_secagg_writes_the_run_directory_and_audit_logs(federation):
    fed = federation
    run_toml = fed.run_toml(
        "dp-secagg.toml",
        FAST_RUN.format(
            rounds=2, seed=1, timeout=300, stage_timeout=120, **ALL_SITES_SECURE
        ),
    )
    fed.approve(fed.app_hash(run_toml), fed.site_names)

    result = _launch(fed, run_toml)
    assert result.returncode == 0, result.stdout + result.stderr
    out = fed.root / "out" / "dp-secagg"
    summary = json.loads((out / "run.json").read_text())
    assert summary["rounds_completed"] == 2
    assert sorted(summary["final"]["sites"]) == fed.site_names  # named from sites.json
    for site, spent in summary["privacy_spent"].items():
        assert 0 < spent["epsilon_run"] <= 8.0 + 1e-6, site
    assert (out / "adapter" / "adapter_config.json").is_file()

    manifests = sorted((out / "manifests").glob("round-*.json"))
    assert [m.name for m in manifests] == [f"round-00{i}.json" for i in range(3)]
    last = json.loads(manifests[-1].read_text())
    assert last["aggregation"] == "secagg+"
    assert last["secure_aggregation"]["sites_aggregated"] == 3
    assert last["differential_privacy"]["enabled"] is True
    assert sorted(p["site"] for p in last["participants"]) == fed.site_names
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["aggregation"] == "secagg+" for r in rounds[1:])

    coordinator_log = fed.state / "audit.jsonl"
    assert verify_audit(coordinator_log).ok
    events = [e["event"] for e in read_audit(coordinator_log)]
    for wanted in (
        "coordinator_started",
        "site_enrolled",
        "run_started",
        "round_finished",
        "run_finished",
    ):
        assert wanted in events, wanted
    patient_ids = set()
    for name in fed.site_names:
        site_log = fed.site_state(name) / "audit.jsonl"
        assert verify_audit(site_log).ok
        site_events = [e["event"] for e in read_audit(site_log)]
        for wanted in (
            "site_daemon_started",
            "app_approved",
            "run_started",
            "round_finished",
            "privacy_spent",
        ):
            assert wanted in site_events, (name, wanted)
        site = SiteConfig.from_toml(fed.site_toml(name))
        column = site.ehr.patient_id
        patient_ids |= set(
            pq.read_table(site.ehr_path, columns=[column]).column(column).to_pylist()
        )
    logs = coordinator_log.read_text() + "".join(
        (fed.site_state(n) / "audit.jsonl").read_text() for n in fed.site_names
    )
    leaked = [p for p in patient_ids if re.search(rf"\b{re.escape(str(p))}\b", logs)]
    assert not leaked, f"patient ids in the audit logs: {leaked[:3]}"


def test_each_site_tells_its_operator_it_reached_the_coordinator(federation):
    fed = federation
    for name in fed.site_names:
        daemon = fed.daemons[name]
        said = f"site {name}: connected to the coordinator at 127.0.0.1:{fed.port}"
        wait_for(lambda d=daemon, s=said: s in d.output(), 60, f"{name}'s connection")


def test_a_site_refuses_a_run_it_has_not_approved(federation):
    fed = federation
    run_toml = fed.run_toml(
        "unapproved.toml",
        FAST_RUN.format(
            rounds=1, seed=99, timeout=120, stage_timeout=60, **ALL_SITES_SECURE
        ),
    )
    result = _launch(fed, run_toml, timeout_s=300)
    assert result.returncode == 7, result.stdout + result.stderr
    assert "approve" in (result.stdout + result.stderr)
    refused = [
        e
        for name in fed.site_names
        for e in read_audit(fed.site_state(name) / "audit.jsonl")
        if e["event"] == "app_refused"
    ]
    assert refused and all(e["fab_hash"] == fed.app_hash(run_toml) for e in refused)


def _refused_starts(fed: LoopbackFederation, names: list[str]) -> dict[str, str]:
    """Start these site daemons together; each must be refused (exit 7)."""
    daemons = {name: fed.start_site(name) for name in names}
    wait_for(
        lambda: all(d.proc.poll() is not None for d in daemons.values()),
        180,
        f"{', '.join(names)} to be refused",
    )
    for daemon in daemons.values():
        assert daemon.proc.returncode == 7, daemon.output()[-2000:]
    return {name: daemon.output() for name, daemon in daemons.items()}


def _clone_site(
    fed: LoopbackFederation, name: str, key: Path, ca: Path | None = None
) -> None:
    """A new site folder sharing site-01's data, with its own key (and CA)."""
    site_dir = fed.root / "sites" / name
    site_dir.mkdir()
    for item in fed.site_toml(fed.site_names[0]).parent.iterdir():
        if item.name in (".wardround-cache", "privacy-ledger"):
            continue
        target = site_dir / item.name
        if item.is_dir():
            target.symlink_to(item.resolve())
        else:
            target.write_bytes(item.read_bytes())
    # A refused key is retried while a restarting coordinator re-enrols its sites;
    # these sites are refused for good, so do not wait for that.
    fed.add_deployment(name, key=key, ca=ca, refusal_grace_s=0.0)


def test_unenrolled_and_revoked_keys_and_a_foreign_ca_are_refused(federation):
    # one test, three daemons at once: each refusal costs a daemon's start-up
    fed = federation
    coordinator = str(fed.coordinator_toml)
    keys = {}
    for name in ("site-unenrolled", "site-revoked"):
        keys[name] = generate_site_keypair(name, fed.root / "keys")
        _clone_site(fed, name, keys[name].private_key)
    revoked_key = keys["site-revoked"].public_key
    added = fed.enrol("site-revoked", key=revoked_key)
    assert added.returncode == 0, added.stderr
    revoked = fed.cli("sites", "revoke", "site-revoked", "--config", coordinator)
    assert revoked.returncode == 0, revoked.stderr
    listed = json.loads(
        fed.cli("sites", "list", "--config", coordinator, "--json").stdout
    )
    assert {r["site"]: r["state"] for r in listed}["site-revoked"] == "revoked"
    other_ca = init_ca(fed.root / "other-pki")
    enrolled_key = fed.root / "keys" / f"{fed.site_names[0]}.key"
    _clone_site(fed, "site-other-ca", enrolled_key, ca=other_ca.cert)

    outputs = _refused_starts(fed, ["site-unenrolled", "site-revoked", "site-other-ca"])
    for name in ("site-unenrolled", "site-revoked"):
        assert "not enrolled, it was revoked" in outputs[name]
        assert "wardround sites add" in outputs[name]
    assert "TLS" in outputs["site-other-ca"]
    assert "root-certificate" in outputs["site-other-ca"]


def _kept_train_answers(fed: LoopbackFederation) -> dict[Path, tuple[int, str]]:
    """Each kept training answer (the sites' latest per run): its round and question."""
    kept: dict[Path, tuple[int, str]] = {}
    for name in fed.site_names:
        releases = fed.site_toml(name).parent / "privacy-ledger" / "releases"
        for path in releases.glob("*/train.json"):
            try:
                meta = json.loads(path.read_text())
                kept[path] = (int(meta["round"]), str(meta["request"]))
            except (OSError, ValueError, KeyError):
                continue  # being replaced
    return kept


def _new_round_answers(
    fed: LoopbackFederation, before: dict[Path, tuple[int, str]], server_round: int
) -> list[Path]:
    """Kept answers of ``server_round`` written since ``before`` (earlier runs' aside)."""
    return [
        path
        for path, (kept_round, request) in _kept_train_answers(fed).items()
        if kept_round == server_round and before.get(path, (0, ""))[1] != request
    ]


def _rounds_done(run_dir: Path) -> int:
    rounds = run_dir / "rounds.jsonl"
    return len(read_jsonl(rounds)) - 1 if rounds.exists() else 0


def test_a_site_killed_mid_run_and_the_run_finishes_with_the_rest(federation):
    fed = federation
    run_toml = fed.run_toml(
        "site-killed.toml",
        FAST_RUN.format(rounds=3, seed=3, timeout=90, stage_timeout=30, **ONE_MAY_DROP),
    )
    fed.approve(fed.app_hash(run_toml), fed.site_names)
    before = set(fed.run_dirs())
    follower = subprocess.Popen(
        [
            *WARDROUND,
            "launch",
            "--config",
            str(run_toml),
            "--coordinator",
            str(fed.coordinator_toml),
            "--out",
            str(fed.root / "out" / "site-killed"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=fed.root,
    )
    try:
        run_dir = wait_for(lambda: sorted(set(fed.run_dirs()) - before), 60, "the run")[
            0
        ]
        wait_for(lambda: _rounds_done(run_dir) >= 1, 300, "round 1")
        victim = fed.site_names[-1]
        fed.kill(victim)
        output, _ = follower.communicate(timeout=600)
    finally:
        if follower.poll() is None:
            follower.send_signal(signal.SIGTERM)
            follower.wait(timeout=30)
    assert follower.returncode == 0, output
    summary = json.loads((fed.root / "out" / "site-killed" / "run.json").read_text())
    assert summary["rounds_completed"] == 3
    rounds = read_jsonl(fed.root / "out" / "site-killed" / "rounds.jsonl")
    assert len(rounds[-1]["train"]) == 2
    assert victim not in {t["site"] for t in rounds[-1]["train"]}
    fed.start_site(victim)
    fed.wait_online(fed.site_names)


def test_a_round_a_site_dropped_out_of_is_asked_again_once_it_is_back(federation):
    """A site frozen through round 2 of a run that needs all 3 (DP, plain
    aggregation) leaves the round short: it is asked again once the site is back,
    the sites that had answered send the same answer again, and the run ends."""
    fed = federation
    run_toml = fed.run_toml(
        "asked-again.toml",
        FAST_RUN.format(
            rounds=2, seed=5, timeout=45, stage_timeout=30, **ALL_SITES_PLAIN
        ),
    )
    fed.approve(fed.app_hash(run_toml), fed.site_names)
    before = set(fed.run_dirs())
    audited = {
        n: len(read_audit(fed.site_state(n) / "audit.jsonl")) for n in fed.site_names
    }
    started = _launch(fed, run_toml, "--detach")
    assert started.returncode == 0, started.stderr
    run_dir = sorted(set(fed.run_dirs()) - before)[0]
    victim = fed.site_names[0]
    wait_for(lambda: _rounds_done(run_dir) >= 1, 300, "round 1")
    frozen = fed.daemons[victim].family()
    for process in frozen:
        process.suspend()
    try:
        wait_for(
            lambda: _coordinator_events(fed, run_dir.name, "round_repeated"),
            300,
            "round 2 asked again",
        )
    finally:
        for process in frozen:
            process.resume()
    out = _follow(fed, run_dir, "asked-again")
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert {t["site"] for t in rounds[2]["train"]} == set(fed.site_names)
    asked = rounds[2]["extra"]["asked_again"]
    assert asked[0]["phase"] == "train"
    [repeated, *_] = _coordinator_events(fed, run_dir.name, "round_repeated")
    assert (repeated["round"], repeated["sites_gone"]) == (2, [victim])
    # The sites that had answered sent the same answer again: the repeat cost
    # them no epsilon and no answer, and nobody trained round 2 twice.
    others = fed.site_names[1:]
    replays = {
        name: [
            e
            for e in read_audit(fed.site_state(name) / "audit.jsonl")[audited[name] :]
            if e["event"] == "answer_replayed" and e["message_type"] == "train"
        ]
        for name in others
    }
    assert all(replays.values()), replays
    run_key = replays[others[0]][-1]["ledger_run"]
    for name in fed.site_names:
        assert _trained_rounds(fed, name, run_key) == [1, 2], name


def _follow(fed: LoopbackFederation, run_dir: Path, out_name: str) -> Path:
    """Follow a running run to its end (`wardround runs --follow`); its output folder."""
    out = fed.root / "out" / out_name
    followed = fed.cli(
        "runs",
        run_dir.name,
        "--follow",
        "--coordinator",
        str(fed.coordinator_toml),
        "--out",
        str(out),
        timeout_s=900,
    )
    assert followed.returncode == 0, followed.stdout + followed.stderr
    return out


def _trained_rounds(fed: LoopbackFederation, name: str, run_key: str) -> list[int]:
    """The rounds a site's answer log counted training answers for, for one run."""
    answers = AnswerLog(fed.site_toml(name).parent / "privacy-ledger" / ANSWER_LOG)
    return [
        e["round"]
        for e in answers.entries()
        if e["run"] == run_key and e["kind"] == "train"
    ]


def _coordinator_events(fed: LoopbackFederation, run_id: str, event: str) -> list[dict]:
    return [
        e
        for e in read_audit(fed.state / "audit.jsonl")
        if e["event"] == event and e.get("run_id") == run_id
    ]


def test_the_coordinator_killed_mid_run_resumes_from_its_last_checkpoint(federation):
    fed = federation
    run_toml = fed.run_toml(
        "resumed.toml",
        # DP on, plain aggregation: the sites' answers left in the clear, so a
        # site sends a round it answered again at no cost (a masked one never)
        FAST_RUN.format(
            rounds=2, seed=4, timeout=300, stage_timeout=120, **ALL_SITES_PLAIN
        ),
    )
    fed.approve(fed.app_hash(run_toml), fed.site_names)
    before = set(fed.run_dirs())
    kept_before = _kept_train_answers(fed)  # earlier runs of this module
    started = _launch(fed, run_toml, "--detach")
    assert started.returncode == 0, started.stderr
    run_dir = sorted(set(fed.run_dirs()) - before)[0]
    # The coordinator stops after a site has trained round 2 and before the round
    # ends: frozen the moment a site keeps its round-2 answer (the round still
    # waits for the other sites and its evaluation), then killed.
    wait_for(
        lambda: _new_round_answers(fed, kept_before, 2), 300, "a site's round-2 answer"
    )
    coordinator = fed.daemons["coordinator"].family()
    for process in coordinator:
        process.suspend()
    assert _rounds_done(run_dir) == 1
    time.sleep(5)  # the other sites' round-2 answers, if they had their message
    for process in coordinator:
        process.kill()
    fed.daemons["coordinator"].proc.wait(timeout=30)
    fed.start_coordinator()
    out = _follow(fed, run_dir, "resumed")
    rounds = [r["round"] for r in read_jsonl(out / "rounds.jsonl")]
    assert rounds == [0, 1, 2]
    summary = json.loads((out / "run.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary.get("resumed_from_round") is not None
    launch = json.loads((run_dir / "launch.json").read_text())
    assert len(launch["flower_run_ids"]) == 2
    assert "run_resumed" in [e["event"] for e in read_audit(fed.state / "audit.jsonl")]
    # The repeated round cost the sites nothing more: a site that had answered
    # it sent the same answer again (no ledger line, not counted), so the DP run
    # reached its last round instead of being refused it.
    replays = [
        e
        for name in fed.site_names
        for e in read_audit(fed.site_state(name) / "audit.jsonl")
        if e["event"] == "answer_replayed"
    ]
    assert replays, "no site sent a kept answer again"
    run_key = replays[0]["ledger_run"]
    for name in fed.site_names:
        assert len(_trained_rounds(fed, name, run_key)) == 2, name
