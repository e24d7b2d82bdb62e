"""Ctrl-C (SIGINT) and SIGTERM stop `wardround simulate` and every process it started."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_simulation_and_all_its_processes(
    synthetic_sites, tmp_path, signum
):
    config = tmp_path / "run.toml"
    config.write_text(
        f'[data]\nsites-dir = "{synthetic_sites}"\n[federation]\nrounds = 50\n'
        "[model]\nimage-size = 32\nmax-note-tokens = 32\nbase = 'random'\n"
        "[secure-aggregation]\nenabled = false\n"  # 2 sites: SecAgg+ needs 3
    )
    cmd = [
        sys.executable,
        "-m",
        "wardround.cli",
        "simulate",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "run"),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
        # as a foreground command: async jobs of a non-interactive shell (a CI
        # script, `nohup cmd &`) inherit SIGINT as ignored, and Python then keeps
        # ignoring it, as any Unix program does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen: dict[int, psutil.Process] = {}
    try:
        # wait until the first round is written: Ray and its workers are up by then
        deadline = time.monotonic() + 240
        while not (tmp_path / "run" / "rounds.jsonl").exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the simulation did not start in time"
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen[child.pid] = child
            time.sleep(0.5)
        for child in psutil.Process(proc.pid).children(recursive=True):
            seen[child.pid] = child
        assert seen, "the simulation started no process"

        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode(errors="replace")
    assert code == (130 if signum == signal.SIGINT else 143), output[-3000:]
    # every process it had started is gone (not merely orphaned)
    _, alive = psutil.wait_procs(list(seen.values()), timeout=15)
    assert not [
        p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
