"""The project is a Flower App: `flwr run .` runs the same ServerApp and ClientApp.

`flwr run` on the local simulation federation starts a detached SuperLink that
outlives the command; the test finds it by its private FLWR_HOME and stops it by PID.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from wardround.ops.processes import stop_processes

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _superlinks_of(flwr_home: str, since: float) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if "flower-superlink" in cmd and proc.info["create_time"] >= since - 1:
                if proc.environ().get("FLWR_HOME") == flwr_home:
                    found.append(proc)
        except psutil.Error:
            continue
    return found


def test_flwr_run_dot_runs_the_federation(tmp_path):
    flwr_home = str(tmp_path / "flwr-home")
    env = dict(os.environ, FLWR_HOME=flwr_home)
    overrides = (
        f'federation.rounds=1 data.sites-dir="{tmp_path / "sites"}" '
        f'output.dir="{tmp_path / "run"}" data.patients-per-site=30'
    )
    pyproject_before = (ROOT / "pyproject.toml").read_text()
    started = time.time()
    try:
        # Flower's local federation has 2 SuperNodes; SecAgg+ needs 3 sites.
        configured = subprocess.run(
            ["flwr", "federation", "simulation-config", "@none/default", "local",
             "--num-supernodes", "3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert configured.returncode == 0, configured.stdout + configured.stderr
        result = subprocess.run(
            ["flwr", "run", ".", "--stream", "--run-config", overrides],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        leftovers = _superlinks_of(flwr_home, started)
        stopped = stop_processes(leftovers)
    output = result.stdout + result.stderr
    # `flwr run` exits 0 even when the run fails: read what it printed too
    assert result.returncode == 0 and "Exit Code" not in output, output[-3000:]
    assert stopped, "expected the detached SuperLink that `flwr run` starts"
    assert not _superlinks_of(flwr_home, started)
    assert (ROOT / "pyproject.toml").read_text() == pyproject_before

    assert (tmp_path / "run" / "run.json").is_file(), output[-3000:]
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["rounds_completed"] == 1
    assert len(summary["final"]["sites"]) == 3
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
