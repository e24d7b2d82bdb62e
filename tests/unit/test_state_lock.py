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
