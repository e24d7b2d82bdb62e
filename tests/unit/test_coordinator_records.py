"""The coordinator's records: sites.json kept safe, launch and stop that keep runs straight."""

from __future__ import annotations

import stat

import pytest

from wardround.common.errors import DataError
from wardround.server.registry import EnrolledSite, backup_path, load_sites, save_sites


def _site(name: str, node_id: int) -> EnrolledSite:
    return EnrolledSite(
        name=name, node_id=node_id, public_key_sha256="ab" * 32, enrolled_at="now"
    )


def test_a_save_keeps_the_version_it_replaces_and_both_are_private(tmp_path):
    path = tmp_path / "sites.json"
    save_sites(path, {"site-01": _site("site-01", 1)})
    assert not backup_path(path).exists()
    save_sites(path, {"site-01": _site("site-01", 1), "site-02": _site("site-02", 2)})
    assert set(load_sites(path)) == {"site-01", "site-02"}
    assert set(load_sites(backup_path(path))) == {"site-01"}
    for file in (path, backup_path(path)):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sites.json",
        "sites.json.bak",
    ]


def test_a_damaged_file_names_the_backup_to_restore(tmp_path):
    path = tmp_path / "sites.json"
    save_sites(path, {"site-01": _site("site-01", 1)})
    save_sites(path, {"site-01": _site("site-01", 5)})
    path.write_text('{"sites": {"site-01": {"node_')
    with pytest.raises(DataError) as err:
        load_sites(path)
    assert "damaged" in err.value.message
    assert f"cp {backup_path(path)} {path}" in err.value.hint
    # the command the hint gives brings the sites back
    path.write_bytes(backup_path(path).read_bytes())
    assert load_sites(path)["site-01"].node_id == 1


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


def test_launch_refuses_a_run_that_wants_more_sites_than_are_enrolled(tmp_path):
    from dataclasses import replace

    from wardround.common.config import RunConfig
    from wardround.common.errors import ConfigError
    from wardround.server.launcher import check_enough_sites

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
    with pytest.raises(ConfigError) as err:
        check_enough_sites(coordinator, run)
    assert "federation.min-sites = 3, but 2 site(s)" in err.value.message
    assert "(site-01, site-02)" in err.value.message
    assert "wardround sites add" in err.value.hint
    plain_two = {
        "federation": {"min-sites": 2},
        "secure-aggregation": {"enabled": False},
    }
    check_enough_sites(coordinator, RunConfig.model_validate(plain_two))
    waits_for_five = {**plain_two, "federation": {"min-sites": 2, "expected-sites": 5}}
    with pytest.raises(ConfigError, match="federation.expected-sites = 5"):
        check_enough_sites(coordinator, RunConfig.model_validate(waits_for_five))


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
