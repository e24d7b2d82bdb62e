"""One daemon per state folder: a second coordinator or site daemon is refused
before it writes anything, naming the one that holds the folder."""

from __future__ import annotations

import os

import pytest

from wardround.common.errors import ConfigError
from wardround.ops.file_lock import sole_user


def test_a_second_user_of_a_state_folder_is_refused_with_the_holders_pid(tmp_path):
    state = tmp_path / "coordinator-state"
    with sole_user(state, "coordinator"):
        with pytest.raises(ConfigError) as err:
            with sole_user(state, "coordinator"):
                pass  # pragma: no cover - never entered
        assert f"is in use by another coordinator (pid {os.getpid()})" in str(
            err.value.message
        )
        assert "Stop that coordinator first" in (err.value.hint or "")
    with sole_user(state, "coordinator"):  # released on exit: usable again
        pass


def test_a_refused_site_daemon_announces_nothing(tmp_path):
    import threading

    from wardround.client.daemon import run_site_daemon

    state = tmp_path / "site-state"
    announced = []
    with sole_user(state, "site daemon"):
        with pytest.raises(ConfigError, match="in use by another site daemon"):
            run_site_daemon(
                _plan(state, tmp_path / "ledger"),
                threading.Event(),
                on_locked=lambda: announced.append("connecting ..."),
            )
    assert announced == []


def _plan(state, ledger):
    from types import SimpleNamespace

    site = SimpleNamespace(ledger_path=ledger)
    return SimpleNamespace(state_dir=state, site=site)  # the SitePlan fields read
