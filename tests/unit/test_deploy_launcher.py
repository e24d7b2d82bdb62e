"""The coordinator's run launcher: app builds, run folders, status and follow."""

from __future__ import annotations

import datetime as dt
import json
import re
import tomllib
from pathlib import Path

import pytest
from coordinator_files import coordinator_config as _coordinator

from wardround.common.config import RunConfig
from wardround.common.errors import ConfigError, FederationError
from wardround.server import launcher
from wardround.server.coordinator_config import CoordinatorConfig
from wardround.server.launcher import (
    APP_NAME,
    LAUNCH_FILE,
    STATUS_FILE,
    app_pyproject,
    build_app,
    check_deployable,
    find_run,
    follow,
    list_runs,
    mark_stopped,
    new_run_name,
    run_status,
    unfinished_runs,
)

# ------------------------------------------------------------------- launcher


def test_build_app_is_deterministic_across_calls_and_roots(tiny_config, tmp_path):
    first = build_app(tiny_config, tmp_path / "a")
    again = build_app(tiny_config, tmp_path / "a")
    elsewhere = build_app(tiny_config, tmp_path / "b")
    assert again == first
    assert elsewhere.fab_hash == first.fab_hash
    assert re.fullmatch(r"[0-9a-f]{64}", first.fab_hash)
    assert first.folder.name == APP_NAME
    assert first.folder.parent.parent == tmp_path / "a"
    assert elsewhere.folder.parent.name == first.folder.parent.name
    assert [p.name for p in first.folder.iterdir()] == ["pyproject.toml"]
    assert (first.folder / "pyproject.toml").read_text() == app_pyproject(tiny_config)


def test_build_app_hash_follows_the_settings(tiny_config, tmp_path):
    base = build_app(tiny_config, tmp_path)
    changed = build_app(tiny_config.with_overrides(federation={"rounds": 9}), tmp_path)
    assert changed.fab_hash != base.fab_hash
    assert changed.folder != base.folder
    assert base.folder.is_dir() and changed.folder.is_dir()


@pytest.mark.parametrize(
    "data", [{"synthesize_sites": 2}, {"sites_dir": "/data/sites"}]
)
def test_check_deployable_refuses_simulation_settings(tiny_config, tmp_path, data):
    config = tiny_config.with_overrides(data=data)
    with pytest.raises(ConfigError) as err:
        check_deployable(config)
    assert "simulation settings" in err.value.message
    assert "[data]" in err.value.hint
    with pytest.raises(ConfigError):
        build_app(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_check_deployable_accepts_the_default(tiny_config):
    check_deployable(tiny_config)


@pytest.mark.parametrize("which", ["tiny", "default", "overrides"])
def test_app_pyproject_round_trips_the_run_config(tiny_config, which):
    config = {
        "tiny": tiny_config,
        "default": RunConfig(),
        "overrides": RunConfig().with_overrides(
            federation={"rounds": 3, "strategy": "fedprox", "proximal_mu": 0.01},
            privacy={"enabled": False},
        ),
    }[which]
    text = app_pyproject(config)
    document = tomllib.loads(text)
    app = document["tool"]["flwr"]["app"]
    assert RunConfig.from_flower(app["config"]) == config
    assert app["components"] == {
        "serverapp": "wardround.server.app:app",
        "clientapp": "wardround.client.app:app",
    }
    assert document["project"]["name"] == APP_NAME
    assert re.fullmatch(r"\d+\.\d+\.\d+", document["project"]["version"])


def test_new_run_name_format():
    moment = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert new_run_name("0123456789abcdef" * 4, moment) == "20250102-030405-01234567"
    assert re.fullmatch(r"\d{8}-\d{6}-deadbeef", new_run_name("deadbeef" * 8))


def _make_run(
    coordinator: CoordinatorConfig,
    name: str,
    status: dict | None = None,
    rounds: int = 0,
    flower_ids: tuple[int, ...] = (),
) -> Path:
    run_dir = coordinator.runs_path / name
    run_dir.mkdir(parents=True)
    (run_dir / LAUNCH_FILE).write_text(
        json.dumps(
            {
                "name": name,
                "fab_hash": "f" * 64,
                "launched_at": "2025-01-01T00:00:00+00:00",
                "flower_run_ids": list(flower_ids),
            }
        )
    )
    if status is not None:
        (run_dir / STATUS_FILE).write_text(json.dumps(status))
    if rounds:
        lines = [json.dumps({"round": r}) for r in range(rounds)]
        (run_dir / "rounds.jsonl").write_text("\n".join(lines) + "\n\n")
    return run_dir


def test_run_status_counts_rounds_after_the_baseline(tmp_path):
    coordinator = _coordinator(tmp_path)
    run_dir = _make_run(coordinator, "r1", {"state": "running", "rounds": 5}, rounds=3)
    status = run_status(run_dir)
    assert status == {"state": "running", "rounds": 5, "rounds_done": 2}
    assert run_status(_make_run(coordinator, "r2"))["rounds_done"] == 0
    # a half-written status file reads as empty
    (run_dir / STATUS_FILE).write_text('{"state": "runn')
    assert run_status(run_dir) == {"rounds_done": 2}


@pytest.fixture
def runs(tmp_path) -> CoordinatorConfig:
    coordinator = _coordinator(tmp_path)
    _make_run(
        coordinator,
        "20250101-000000-aaaaaaaa",
        {"state": "finished", "rounds": 2},
        3,
        (1,),
    )
    _make_run(
        coordinator,
        "20250102-000000-bbbbbbbb",
        {"state": "running", "rounds": 4},
        2,
        (2,),
    )
    _make_run(coordinator, "20250102-120000-cccccccc", None, 0, (3, 4))
    _make_run(
        coordinator, "20250103-000000-dddddddd", {"state": "failed", "reason": "boom"}
    )
    (coordinator.runs_path / "not-a-run").mkdir()  # no launch.json: ignored
    return coordinator


def test_list_runs_newest_first_skips_folders_without_launch(runs):
    rows = list_runs(runs)
    assert [r["name"] for r in rows] == [
        "20250103-000000-dddddddd",
        "20250102-120000-cccccccc",
        "20250102-000000-bbbbbbbb",
        "20250101-000000-aaaaaaaa",
    ]
    by_name = {r["name"]: r for r in rows}
    assert by_name["20250101-000000-aaaaaaaa"]["state"] == "finished"
    assert by_name["20250101-000000-aaaaaaaa"]["round"] == 2
    assert by_name["20250102-120000-cccccccc"]["state"] == "starting"
    assert by_name["20250102-120000-cccccccc"]["flower_run_ids"] == [3, 4]
    assert by_name["20250103-000000-dddddddd"]["reason"] == "boom"
    assert by_name["20250102-000000-bbbbbbbb"]["dir"] == str(
        runs.runs_path / "20250102-000000-bbbbbbbb"
    )


def test_list_runs_without_a_runs_folder_is_empty(tmp_path):
    assert list_runs(_coordinator(tmp_path)) == []
    assert unfinished_runs(_coordinator(tmp_path)) == []


def test_find_run_by_name_or_unique_prefix(runs):
    exact = find_run(runs, "20250101-000000-aaaaaaaa")
    assert exact == runs.runs_path / "20250101-000000-aaaaaaaa"
    assert find_run(runs, "20250101") == exact
    assert find_run(runs, "20250102-12") == runs.runs_path / "20250102-120000-cccccccc"


def test_find_run_refuses_ambiguous_and_unknown_names(runs):
    with pytest.raises(ConfigError) as err:
        find_run(runs, "20250102")
    assert "several runs" in err.value.message
    assert "20250103-000000-dddddddd" in err.value.message  # lists recent runs
    with pytest.raises(ConfigError, match="no run named 'zzz'"):
        find_run(runs, "zzz")
    with pytest.raises(ConfigError, match="no run"):
        find_run(runs, "not-a-run")  # a folder, but never launched


def test_mark_stopped_keeps_the_status_and_ends_the_run(runs):
    run_dir = runs.runs_path / "20250102-000000-bbbbbbbb"
    before = {p.name for p in unfinished_runs(runs)}
    assert before == {"20250102-000000-bbbbbbbb", "20250102-120000-cccccccc"}
    mark_stopped(run_dir, "stopped by the coordinator admin")
    status = json.loads((run_dir / STATUS_FILE).read_text())
    assert status["state"] == "stopped"
    assert status["reason"] == "stopped by the coordinator admin"
    assert status["rounds"] == 4  # what the ServerApp wrote stays
    assert "updated" in status
    assert [p.name for p in unfinished_runs(runs)] == ["20250102-120000-cccccccc"]
    # a run that never wrote a status can be stopped too
    mark_stopped(runs.runs_path / "20250102-120000-cccccccc", "admin")
    assert unfinished_runs(runs) == []


def test_follow_returns_at_once_on_a_finished_run(runs, monkeypatch):
    def no_flower(*_args, **_kwargs):
        raise AssertionError("a finished run needs no flwr call")

    monkeypatch.setattr(launcher, "flower_status", no_flower)
    seen: list[dict] = []
    result = follow(
        runs,
        runs.runs_path / "20250101-000000-aaaaaaaa",
        seen.append,
        poll_s=0.001,
        flower_poll_s=0.0,
    )
    assert result.state == "finished" and result.reason == ""
    assert result.status["rounds_done"] == 2
    assert len(seen) == 1 and seen[0]["state"] == "finished"


def test_follow_reports_a_serverapp_that_died_without_status(runs, monkeypatch):
    calls: list[int] = []

    def flower_status(coordinator, flower_run_id):
        calls.append(flower_run_id)
        if len(calls) < 3:
            return {"status": "running"}
        return {"status": "finished:failed", "status-details": "ServerApp crashed"}

    monkeypatch.setattr(launcher, "flower_status", flower_status)
    run_dir = runs.runs_path / "20250102-000000-bbbbbbbb"
    progress: list[dict] = []
    result = follow(runs, run_dir, progress.append, poll_s=0.001, flower_poll_s=0.0)
    assert result.state == "failed"
    assert result.reason == "Flower: ServerApp crashed"
    assert result.status["state"] == "running"  # status.json stayed as it was
    assert calls == [2, 2, 2]  # the newest Flower run id of the run
    assert len(progress) >= 3


def test_follow_prefers_the_serverapps_last_status(runs, monkeypatch):
    run_dir = runs.runs_path / "20250102-000000-bbbbbbbb"

    def flower_status(coordinator, flower_run_id):
        # the ServerApp wrote its final status just before it exited
        (run_dir / STATUS_FILE).write_text(
            json.dumps({"state": "finished", "rounds": 4})
        )
        return {"status": "finished:completed"}

    monkeypatch.setattr(launcher, "flower_status", flower_status)
    result = follow(runs, run_dir, lambda _s: None, poll_s=0.001, flower_poll_s=0.0)
    assert result.state == "finished"


def test_follow_keeps_going_while_the_coordinator_restarts(runs, monkeypatch):
    run_dir = runs.runs_path / "20250102-000000-bbbbbbbb"
    calls = []

    def flower_status(coordinator, flower_run_id):
        calls.append(flower_run_id)
        raise FederationError("`flwr ls` failed: Connection refused")

    def on_progress(status):
        if len(calls) >= 2:
            (run_dir / STATUS_FILE).write_text(
                json.dumps({"state": "failed", "reason": "site refused"})
            )

    monkeypatch.setattr(launcher, "flower_status", flower_status)
    result = follow(runs, run_dir, on_progress, poll_s=0.001, flower_poll_s=0.0)
    assert result.state == "failed" and result.reason == "site refused"
    assert len(calls) >= 2
