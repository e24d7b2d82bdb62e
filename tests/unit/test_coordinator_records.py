"""The coordinator's records: sites.json kept safe; launch and stop keep runs straight."""

from __future__ import annotations

import stat

import pytest

from wardround.common.errors import DataError
from wardround.server.registry import EnrolledSite, backup_path, load_sites, save_sites


def _site(name: str, node_id: int) -> EnrolledSite:
    return EnrolledSite(
        name=name, node_id=node_id, public_key_sha256="ab" * 32, enrolled_at="now"
    )


def test_a_save_writes_a_private_copy_of_the_same_version(tmp_path):
    path = tmp_path / "sites.json"
    (tmp_path / "sites.json.tmp").write_text("left by a crash")
    (tmp_path / "sites.json.tmp").chmod(0o644)
    save_sites(path, {"site-01": _site("site-01", 1)})
    save_sites(path, {"site-01": _site("site-01", 1), "site-02": _site("site-02", 2)})
    assert set(load_sites(path)) == {"site-01", "site-02"}
    assert backup_path(path).read_bytes() == path.read_bytes()
    for file in (path, backup_path(path)):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sites.json",
        "sites.json.bak",
    ]


def test_restoring_the_copy_never_brings_back_a_revoked_key(tmp_path):
    from dataclasses import replace

    path = tmp_path / "sites.json"
    save_sites(path, {"site-01": _site("site-01", 1)})
    revoked = replace(_site("site-01", 1), revoked_at="2026-12-06T20:00:00+00:00")
    save_sites(path, {"site-01": revoked})
    path.write_text('{"sites": {"site-01": {"node_')
    with pytest.raises(DataError) as err:
        load_sites(path)
    assert "damaged" in err.value.message
    assert f"cp {backup_path(path)} {path}" in err.value.hint
    # the command the hint gives restores the latest version, revocation included
    path.write_bytes(backup_path(path).read_bytes())
    assert not load_sites(path)["site-01"].active


@pytest.mark.parametrize("text", ['{"sites": []}', '{"sites": {"a": 3}}', "[]"])
def test_a_file_of_the_wrong_shape_is_damaged_not_a_traceback(tmp_path, text):
    path = tmp_path / "sites.json"
    path.write_text(text)
    with pytest.raises(DataError, match="is damaged"):
        load_sites(path)


def test_a_damaged_file_without_a_backup_says_to_enrol_again(tmp_path):
    path = tmp_path / "sites.json"
    path.write_bytes(b"\xff\xfe not json")
    with pytest.raises(DataError) as err:
        load_sites(path)
    assert "wardround sites add" in err.value.hint
    assert "backup" not in err.value.hint


def _coordinator(tmp_path):
    from coordinator_files import TLS_TABLE

    from wardround.server.coordinator_config import CoordinatorConfig

    toml = tmp_path / "coordinator.toml"
    toml.write_text('[coordinator]\nstate-dir = "state"\n' + TLS_TABLE)
    config = CoordinatorConfig.from_toml(toml)
    config.state_path.mkdir(parents=True)
    return config


def test_launch_warns_of_a_run_that_wants_more_sites_than_are_enrolled(tmp_path):
    from dataclasses import replace

    from wardround.common.config import RunConfig
    from wardround.server.launcher import site_count_warnings

    coordinator = _coordinator(tmp_path)
    revoked = replace(_site("site-03", 3), revoked_at="then")
    save_sites(
        coordinator.sites_path,
        {
            "site-01": _site("site-01", 1),
            "site-02": _site("site-02", 2),
            "site-03": revoked,
        },
    )
    run = RunConfig.model_validate(
        {"federation": {"min-sites": 3}, "secure-aggregation": {"enabled": False}}
    )
    [warning] = site_count_warnings(coordinator, run)
    assert "federation.min-sites = 3, but 2 site(s)" in warning
    assert "(site-01, site-02)" in warning and "pauses at its first round" in warning
    assert "wardround sites add" in warning
    plain_two = {
        "federation": {"min-sites": 2},
        "secure-aggregation": {"enabled": False},
    }
    assert site_count_warnings(coordinator, RunConfig.model_validate(plain_two)) == []
    waits_for_five = {**plain_two, "federation": {"min-sites": 2, "expected-sites": 5}}
    [warning] = site_count_warnings(
        coordinator, RunConfig.model_validate(waits_for_five)
    )
    assert "federation.expected-sites = 5" in warning
    assert "waits join-timeout-s (120 s)" in warning


def _run(coordinator, name: str, status: dict) -> None:
    import json

    run_dir = coordinator.runs_path / name
    run_dir.mkdir(parents=True)
    (run_dir / "launch.json").write_text(
        json.dumps({"name": name, "flower_run_ids": []})
    )
    (run_dir / "status.json").write_text(json.dumps(status))


def test_stop_leaves_an_ended_run_as_it_ended_and_stops_a_running_one(tmp_path):
    import json

    from wardround.common.errors import ConfigError
    from wardround.server.launcher import stop_run

    coordinator = _coordinator(tmp_path)
    _run(coordinator, "20261206-100000-aaaa", {"state": "finished"})
    _run(coordinator, "20261206-110000-bbbb", {"state": "training", "round": 2})
    with pytest.raises(ConfigError, match="has already finished; there is nothing"):
        stop_run(coordinator, "20261206-10")
    ended = coordinator.runs_path / "20261206-100000-aaaa" / "status.json"
    assert json.loads(ended.read_text())["state"] == "finished"
    stopped = stop_run(coordinator, "20261206-11")
    status = json.loads((stopped / "status.json").read_text())
    assert status["state"] == "stopped" and status["round"] == 2
    with pytest.raises(ConfigError, match="has already stopped"):
        stop_run(coordinator, "20261206-11")


def test_a_run_that_ends_before_the_stop_reaches_it_stays_ended(tmp_path, monkeypatch):
    import json

    from wardround.common.errors import ConfigError, FederationError
    from wardround.server import launcher

    coordinator = _coordinator(tmp_path)
    name = "20261206-120000-cccc"
    _run(coordinator, name, {"state": "evaluating"})
    run_dir = coordinator.runs_path / name
    (run_dir / "launch.json").write_text(json.dumps({"flower_run_ids": [7]}))

    def flower_finished_meanwhile(*_args, **_kwargs):
        (run_dir / "status.json").write_text(json.dumps({"state": "finished"}))
        raise FederationError("run 7 is already finished")

    monkeypatch.setattr(launcher, "flwr_json", flower_finished_meanwhile)
    with pytest.raises(ConfigError, match="finished before the stop reached it"):
        launcher.stop_run(coordinator, name)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
