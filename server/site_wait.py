"""Waiting for a run's sites before each round.

Flower's strategies block in ``sample_nodes`` until ``min_available_nodes`` are
connected, silently and for ever; :class:`SiteWait` comes first, so that the run
says what it waits for and goes ahead without sites that do not come.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.serverapp import Grid

log = logging.getLogger(__name__)

_JOIN_POLL_S = 1.0
"""How often the join wait asks the grid who is connected."""
_PAUSE_POLL_S = 2.0
"""How often a paused run asks again (at most; less with a shorter join timeout)."""


@dataclass
class SiteWait:
    """Waits, before a round, until the run's sites are connected.

    Flower's strategies block in ``sample_nodes`` until ``min_available_nodes`` are
    connected, silently and for ever; this wait comes first so that the run says
    what it waits for (``status.json``, the observers) and goes ahead without
    sites that do not come.

    Parameters
    ----------
    grid
        Flower's grid; only ``get_node_ids`` is called.
    expected
        How many sites the run expects; a round waits up to ``join_timeout_s`` for
        them.
    min_sites
        Below this many connected sites the run pauses until enough are back.
    join_timeout_s
        How long a round waits for the expected sites.
    on_paused, on_resumed
        Called when the run pauses (with the reason) and when it goes on.
    name_of
        Names a node id for the logs (``index`` -1: not known before it replies).
    expected_nodes
        The node ids the run expects (enrolled sites), to name missing ones.
    """

    grid: Grid
    expected: int
    min_sites: int
    join_timeout_s: float
    on_paused: Callable[[str], None]
    on_resumed: Callable[[], None]
    name_of: Callable[[int, int], str] = lambda node, index: f"node-{node}"
    expected_nodes: tuple[int, ...] = ()
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def before_round(self, server_round: int) -> list[int]:
        """The connected node ids once the round may start (pauses while too few).

        Waits up to ``join_timeout_s`` for ``expected`` sites; goes ahead with at
        least ``min_sites``; with fewer, pauses until that many are back and then
        gives the others another ``join_timeout_s`` to follow.
        """
        while True:
            nodes = self._join()
            if len(nodes) >= self.min_sites:
                self._log_missing(server_round, nodes)
                return nodes
            self._pause_until_enough(nodes)

    def ensure_min(self) -> list[int]:
        """The connected node ids, pausing first while fewer than ``min_sites``.

        For the evaluation phase of a round: its sites were just there, so it only
        guards against Flower's silent wait, without another join timeout.
        """
        nodes = self._connected()
        if len(nodes) < self.min_sites:
            nodes = self._pause_until_enough(nodes)
        return nodes

    def _connected(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def _join(self) -> list[int]:
        deadline = self.clock() + self.join_timeout_s
        nodes = self._connected()
        while len(nodes) < self.expected:
            left = deadline - self.clock()
            if left <= 0:
                break
            self.sleep(min(_JOIN_POLL_S, left))
            nodes = self._connected()
        return nodes

    def _pause_until_enough(self, nodes: list[int]) -> list[int]:
        reason = (
            f"waiting for sites: {len(nodes)} connected, the run needs at least "
            f"{self.min_sites} (federation.min-sites)"
        )
        log.warning("run paused: %s", reason)
        self.on_paused(reason)
        # Never ask slower than a round would wait for a join (tests use tiny ones).
        interval = min(_PAUSE_POLL_S, self.join_timeout_s)
        while len(nodes) < self.min_sites:
            self.sleep(interval)
            nodes = self._connected()
        log.info("run resumed: %d site(s) connected", len(nodes))
        self.on_resumed()
        return nodes

    def _log_missing(self, server_round: int, nodes: list[int]) -> None:
        if len(nodes) >= self.expected:
            return
        missing = sorted(set(self.expected_nodes) - set(nodes))
        names = ", ".join(self.name_of(n, -1) for n in missing) or "(no roster)"
        log.warning(
            "round %d goes ahead with %d of %d expected site(s) after %gs; missing: %s",
            server_round,
            len(nodes),
            self.expected,
            self.join_timeout_s,
            names,
        )
