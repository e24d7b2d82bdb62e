"""Stop every process a command started, by PID.

Ray (simulation) and Flower (deployment) start helper processes; some outlive a
normal shutdown. :class:`ChildProcessGuard` records this process's descendants on
entry and terminates, by PID, every new one that is still alive on exit.
"""

from __future__ import annotations

import logging
from types import TracebackType

import psutil

log = logging.getLogger(__name__)


def descendants() -> dict[int, psutil.Process]:
    """This process's live descendants by PID."""
    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return {}


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
        if self.shutdown_ray:
            try:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            except Exception as err:  # a failed shutdown must not hide the real error
                log.debug("ray.shutdown failed: %s", err)
        leftovers = [p for pid, p in descendants().items() if pid not in self.before]
        if leftovers:
            self.stopped = stop_processes(leftovers)
            log.debug(
                "stopped %d leftover process(es): %s", len(self.stopped), self.stopped
            )
