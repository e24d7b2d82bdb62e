"""Stop every process a command started, by PID.

Ray (simulation) and Flower (deployment) start helper processes; some outlive a
normal shutdown. :class:`ChildProcessGuard` records this process's descendants on
entry and terminates, by PID, every new one that is still alive on exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import psutil

log = logging.getLogger(__name__)


def descendants() -> dict[int, psutil.Process]:
    """This process's live descendants by PID (a zombie awaiting its reaping is not)."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return {}
    return {p.pid: p for p in children if _alive(p)}


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone meanwhile
        return False


def stop_processes(processes: list[psutil.Process], grace_s: float = 5.0) -> list[int]:
    """SIGTERM, wait ``grace_s``, then SIGKILL what is left; return the PIDs stopped."""
    for proc in processes:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return [p.pid for p in processes]


class ChildProcessGuard:
    """Context manager: on exit, stop descendants that were not there on entry."""

    def __init__(self, shutdown_ray: bool = True) -> None:
        self.shutdown_ray = shutdown_ray
        self.before: set[int] = set()
        self.stopped: list[int] = []

    def __enter__(self) -> ChildProcessGuard:
        self.before = set(descendants())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(
            exc_type, (KeyboardInterrupt, SystemExit)
        ):
            # Interrupted while the engine thread may still be inside a Ray call:
            # ray.shutdown() or a dying raylet then makes Ray end this whole process
            # with exit code 1. Freeze the new processes instead (their sockets stay
            # open, so Ray notices nothing); exit_killing() kills them on the way out.
            for pid, proc in descendants().items():
                if pid not in self.before:
                    _freeze(proc)
            return
        if self.shutdown_ray:
            try:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            except Exception as err:  # a failed shutdown must not hide the real error
                log.debug("ray.shutdown failed: %s", err)
        # A few passes: a process may start while the previous ones are stopped
        # (Ray's raylet launching a worker as it shuts down).
        for _ in range(3):
            leftovers = [
                p for pid, p in descendants().items() if pid not in self.before
            ]
            if not leftovers:
                break
            self.stopped += stop_processes(leftovers)
            log.debug("stopped %d leftover process(es): %s", len(leftovers), leftovers)


_frozen: list[psutil.Process] = []


def _freeze(proc: psutil.Process) -> None:
    try:
        proc.suspend()
        _frozen.append(proc)
    except psutil.Error:
        pass


def exit_killing(code: int) -> None:
    """Kill, by PID, the processes an interrupted guard froze; then exit with ``code``.

    The kills and the exit are back to back, before Ray in this process can notice
    its helpers dying and exit with its own code. The killed processes are reaped by
    init.
    """
    for proc in _frozen:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(code)


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM when the daemon that started it dies, even by
    # SIGKILL, so a killed daemon never leaves an orphaned SuperLink or SuperNode.
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_child(
    args: list[str], env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start a child process that logs to ``log_path`` and dies with this process.

    This interpreter's ``bin/`` goes first on the child's PATH: Flower's SuperLink
    starts ``flower-superexec`` by name, and under systemd the venv is not on PATH.
    """
    env = dict(env)
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), env.get("PATH", os.defpath)]
    )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(  # noqa: S603 - args are built by wardround, not a shell
            args,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )


def stop_child(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop a child and every process it started, by PID."""
    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        family = []
    stop_processes(family, grace_s=grace_s)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def flower_binary(name: str) -> str:
    """A Flower console script, next to this interpreter first.

    A virtual environment's ``bin/`` is not always on PATH (systemd units, cron).
    """
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)
