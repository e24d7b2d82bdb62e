"""Flower 1.41's deployment engine, paced for rounds of seconds rather than minutes.

Three waits are fixed inside Flower 1.41 and dominate a small model's round on a
deployment: the idle SuperNode asks for work every 3 s; a reply is checked for
every 0.5 s; and an array that has been announced but not yet uploaded is retried
after 1 s, then 2 s, then 4 s (``pull_objects``' default backoff), on both the
SuperNode (fetching a message) and the ServerApp (fetching a reply). With five
exchanges per SecAgg+ round those waits cost 20–30 s per round.

These functions shorten them in the process that runs that Flower code (the site's
SuperNode via :mod:`wardround.client.supernode_main`, the coordinator's ServerApp).
Each checks that its patch point still looks as expected and otherwise leaves
Flower as it is: a Flower upgrade can only make a round slower, never wrong.

One wait is not about pace: the ServerApp's Grid fetches a reply's arrays once the
reply is announced, retrying up to 500 times. A site that dies (or loses its
network) between announcing its reply and uploading the arrays stalls that fetch,
and with it every other site's reply, for minutes: past the round's timeout, so
the round loses the sites that did reply. :func:`bound_serverapp_pulls` makes
those fetches give up at the deadline of the exchange they belong to
(:func:`pulls_end_by`, which :class:`~.prompt_grid.PromptGrid` sets).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

PACING_ENV = "WARDROUND_FLOWER_PACING"
"""Set to 0 to run Flower's own pacing (the deployment benchmark's baseline)."""

OBJECT_POLL_S = 0.02
"""First retry of an announced-but-not-uploaded array (Flower: 1 s)."""
OBJECT_POLL_CAP_S = 0.25
"""Longest retry interval for such an array (Flower: 10 s)."""
LATE_PULL_GRACE_S = 2.0
"""How long a reply announced at (or after) its exchange's deadline may still take
to deliver its arrays."""

_exchange = threading.local()
"""The deadline (``time.monotonic``) of the exchange the current thread runs."""


class _CappedSleep:
    """The ``time`` module, with ``sleep`` capped at ``cap_s`` seconds."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def prompt_object_pulls(module: ModuleType) -> bool:
    """Make ``module.pull_objects`` retry missing arrays after milliseconds, not seconds."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    if getattr(module, "pull_objects", None) is not pull_objects:
        return False
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        pull_objects, initial_backoff=OBJECT_POLL_S, backoff_cap=OBJECT_POLL_CAP_S
    )
    return True


def pace_supernode(poll_s: float) -> bool:
    """Cap the SuperNode's polling sleeps at ``poll_s`` and make its array pulls prompt."""
    from flwr.supernode import start_client_internal

    if getattr(start_client_internal, "time", None) is not time:
        return False
    start_client_internal.time = _CappedSleep(poll_s)  # type: ignore[assignment]
    return prompt_object_pulls(start_client_internal)


@contextlib.contextmanager
def pulls_end_by(deadline: float | None) -> Iterator[None]:
    """Within the block, this thread's reply-array fetches give up at ``deadline``.

    ``deadline`` is a ``time.monotonic()`` value (None: no deadline). Takes effect
    where :func:`bound_serverapp_pulls` has patched the Grid.
    """
    saved = getattr(_exchange, "deadline", None)
    _exchange.deadline = deadline
    try:
        yield
    finally:
        _exchange.deadline = saved


def _pull_until_deadline(
    pull: Callable[..., dict[str, bytes]], *args: Any, **kwargs: Any
) -> dict[str, bytes]:
    deadline = getattr(_exchange, "deadline", None)
    if deadline is not None:
        kwargs["max_time"] = max(deadline - time.monotonic(), LATE_PULL_GRACE_S)
    return pull(*args, **kwargs)


def serverapp_grid_module() -> ModuleType:
    """Flower's module whose ``pull_objects`` :func:`bound_serverapp_pulls` replaces.

    A test that runs a deployed ServerApp in its own process saves and restores it.
    """
    from flwr.superlink.grid import http_grid

    return http_grid


def bound_serverapp_pulls(*, prompt: bool = True) -> bool:
    """Make the ServerApp's Grid stop fetching reply arrays at the exchange's deadline.

    With ``prompt`` the fetches also retry after milliseconds, not seconds. False
    (nothing changed) when the Grid's ``pull_objects`` is not Flower's own.
    """
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.superlink.grid import http_grid

    if getattr(http_grid, "pull_objects", None) is not pull_objects:
        return False
    paced: Callable[..., dict[str, bytes]] = (
        functools.partial(
            pull_objects, initial_backoff=OBJECT_POLL_S, backoff_cap=OBJECT_POLL_CAP_S
        )
        if prompt
        else pull_objects
    )
    http_grid.pull_objects = functools.partial(_pull_until_deadline, paced)
    return True
