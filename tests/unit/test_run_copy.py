"""`launch --out DIR` copies the finished run into DIR: it never wipes a folder that
holds anything but an earlier copy of the same run."""

import json
from pathlib import Path

import pytest

from wardround.common.errors import ConfigError
from wardround.server.launcher import LAUNCH_FILE, check_copy_target, copy_run


def _run_dir(root, name):
    run_dir = root / "state" / "runs" / name
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / LAUNCH_FILE).write_text(json.dumps({"name": name}))
    (run_dir / "run.json").write_text("{}")
    return run_dir


def test_a_folder_with_the_admins_files_is_refused_and_kept(tmp_path):
    run_dir = _run_dir(tmp_path, "20261207-040131-4f37e74c")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("important")

    with pytest.raises(ConfigError, match="holds other files") as refused:
        copy_run(run_dir, precious)

    assert "new or empty folder" in refused.value.hint
    assert (precious / "notes.txt").read_text() == "important"
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]


def test_another_runs_copy_is_refused_and_the_same_runs_copy_is_replaced(tmp_path):
    first = _run_dir(tmp_path, "20261207-040131-4f37e74c")
    second = _run_dir(tmp_path, "20261207-050000-9a9a9a9a")
    out = tmp_path / "runs-out"
    copy_run(first, out)
    (first / "checkpoints").mkdir()

    with pytest.raises(ConfigError, match="a copy of run 20261207-040131-4f37e74c"):
        copy_run(second, out)
    assert json.loads((out / LAUNCH_FILE).read_text())["name"] == first.name

    copy_run(first, out)  # a newer copy of the same run replaces the older
    assert (out / "checkpoints").is_dir()
    (out / "analysis.ipynb").write_text("the admin's notebook")
    with pytest.raises(ConfigError, match=r"1 file\(s\) the run does not have"):
        copy_run(first, out)
    assert (out / "analysis.ipynb").is_file()


def test_the_run_directory_and_the_coordinators_state_are_never_wiped(
    tmp_path, monkeypatch
):
    run_dir = _run_dir(tmp_path, "20261207-040131-4f37e74c")
    state = tmp_path / "state"
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "round-1.safetensors").write_text("weights")

    # `runs/NAME` from the coordinator's state folder is the run directory itself
    monkeypatch.chdir(state)
    assert copy_run(run_dir, Path("runs") / run_dir.name, state) == run_dir
    assert (run_dir / "checkpoints" / "round-1.safetensors").is_file()
    for out in (state, tmp_path, state / "runs", state / "elsewhere", run_dir / "x"):
        with pytest.raises(ConfigError, match="coordinator's state or runs folder"):
            copy_run(run_dir, out, state)
    assert (run_dir / LAUNCH_FILE).is_file()
    # a symlink to a new folder is followed; the copy lands at its target
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    copy_run(run_dir, tmp_path / "link", state)
    assert (tmp_path / "target" / "checkpoints" / "round-1.safetensors").is_file()


def test_a_new_or_empty_folder_is_taken_and_a_file_is_refused(tmp_path):
    run_dir = _run_dir(tmp_path, "20261207-040131-4f37e74c")
    (tmp_path / "empty").mkdir()

    assert (copy_run(run_dir, tmp_path / "empty") / "run.json").is_file()
    assert (copy_run(run_dir, tmp_path / "new" / "run") / "run.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_copy_target(tmp_path / "file", run_dir)
    # before a launch, when the run has no name yet, any run copy is refused
    with pytest.raises(ConfigError, match="a copy of run"):
        check_copy_target(tmp_path / "empty", None)


def test_launch_refuses_such_a_folder_before_the_run_starts(tmp_path, monkeypatch):
    from coordinator_files import coordinator_config
    from typer.testing import CliRunner

    from wardround.cli import app
    from wardround.server import launcher

    coordinator_config(tmp_path / "coord")
    run_toml = tmp_path / "run.toml"
    runner = CliRunner()
    run_toml.write_text(runner.invoke(app, ["config"]).output)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "ca.key").write_text("the admin's key")
    started = []
    monkeypatch.setattr(launcher, "launch_run", lambda *a: started.append(a))

    result = runner.invoke(
        app,
        [
            "launch",
            "--config",
            str(run_toml),
            "--coordinator",
            str(tmp_path / "coord" / "coordinator.toml"),
            "--out",
            str(precious),
        ],
    )

    assert result.exit_code == 2, result.output
    assert "holds other files" in result.output and started == []
    assert (precious / "ca.key").read_text() == "the admin's key"


def test_launch_says_when_the_coordinator_is_not_running(tmp_path, monkeypatch):
    from coordinator_files import coordinator_config
    from typer.testing import CliRunner

    from wardround.cli import app
    from wardround.ops.file_lock import sole_user
    from wardround.server import launcher

    config = coordinator_config(tmp_path / "coord")
    run_toml = tmp_path / "run.toml"
    runner = CliRunner()
    run_toml.write_text(runner.invoke(app, ["config"]).output)
    started = []
    monkeypatch.setattr(launcher, "launch_run", lambda *a: started.append(a))
    argv = [
        "launch",
        "--config",
        str(run_toml),
        "--coordinator",
        str(tmp_path / "coord" / "coordinator.toml"),
        "--detach",
    ]

    stopped = runner.invoke(app, argv)

    assert stopped.exit_code == 7 and "the coordinator is not running" in stopped.output
    assert "wardround coordinator start" in stopped.output
    assert "enrolled" not in stopped.output  # no site-count warning before it
    assert started == []
    with sole_user(config.state_path, "coordinator"):  # as a running coordinator
        running = runner.invoke(app, argv)
    assert "not running" not in running.output and len(started) == 1


def test_a_runs_folder_on_another_disk_is_guarded_too(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    elsewhere = tmp_path / "big-disk" / "runs"
    elsewhere.mkdir(parents=True)
    (state / "runs").symlink_to(elsewhere)
    run_dir = _run_dir(tmp_path, "20261207-040131-4f37e74c")  # state/runs/NAME

    with pytest.raises(ConfigError, match="state or runs folder"):
        copy_run(run_dir, elsewhere / "copy", state)
    assert (elsewhere / run_dir.name / LAUNCH_FILE).is_file()


def test_launch_from_inside_the_runs_folder_is_refused_before_the_run(
    tmp_path, monkeypatch
):
    from coordinator_files import coordinator_config
    from typer.testing import CliRunner

    from wardround.cli import app
    from wardround.server import launcher

    config = coordinator_config(tmp_path / "coord")
    run_toml = tmp_path / "run.toml"
    runner = CliRunner()
    run_toml.write_text(runner.invoke(app, ["config"]).output)
    (config.state_path / "runs").mkdir(parents=True)
    monkeypatch.chdir(config.state_path / "runs")  # runs/NAME lands in the state
    started = []
    monkeypatch.setattr(launcher, "launch_run", lambda *a: started.append(a))
    argv = ["launch", "--config", str(run_toml), "--coordinator"]

    result = runner.invoke(app, [*argv, str(tmp_path / "coord" / "coordinator.toml")])

    assert result.exit_code == 2 and "state or runs folder" in result.output
    assert started == []
