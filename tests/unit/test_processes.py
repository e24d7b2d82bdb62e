"""Processes a command starts are stopped by PID; a zombie is not a live process."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from wardround.ops.processes import ChildProcessGuard, descendants


def test_the_guard_stops_by_pid_what_started_inside_it():
    with ChildProcessGuard(shutdown_ray=False) as guard:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        assert child.pid in descendants()

    assert guard.stopped == [child.pid]
    assert child.pid not in descendants()
    assert child.wait(timeout=10) is not None


def test_a_zombie_child_is_not_a_live_descendant():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.05)

        assert child.pid not in descendants()
    finally:
        child.wait(timeout=10)  # reaped here, by its parent
