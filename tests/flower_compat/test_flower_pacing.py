"""Flower pacing: the patch points in the installed Flower."""

from __future__ import annotations

import functools
import time
import types

import pytest
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal

from wardround.flower_compat.pacing import (
    LATE_PULL_GRACE_S,
    OBJECT_POLL_CAP_S,
    OBJECT_POLL_S,
    bound_serverapp_pulls,
    pace_supernode,
    prompt_object_pulls,
    pulls_end_by,
)


@pytest.fixture
def restore_flower(monkeypatch):
    """Whatever the tests patch in Flower's modules is put back afterwards."""
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    monkeypatch.setattr(
        start_client_internal, "pull_objects", start_client_internal.pull_objects
    )
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)


def _is_prompt(value) -> bool:
    return (
        isinstance(value, functools.partial)
        and value.func is pull_objects
        and value.keywords
        == {"initial_backoff": OBJECT_POLL_S, "backoff_cap": OBJECT_POLL_CAP_S}
    )


def test_the_patch_points_exist_in_the_installed_flower():
    # checked before any patching: a Flower upgrade that moves them fails here
    assert start_client_internal.time is time
    assert start_client_internal.pull_objects is pull_objects
    assert http_grid.pull_objects is pull_objects


def test_pace_supernode_caps_its_sleeps_and_prompts_its_pulls(restore_flower):
    assert pace_supernode(0.2) is True
    paced = start_client_internal.time
    assert paced is not time
    started = time.perf_counter()
    paced.sleep(3)
    assert time.perf_counter() - started < 0.5
    # everything else of ``time`` still works
    assert abs(paced.monotonic() - time.monotonic()) < 1.0
    assert paced.time() > 0
    assert _is_prompt(start_client_internal.pull_objects)
    assert (
        start_client_internal.pull_objects.keywords["initial_backoff"] == OBJECT_POLL_S
    )


def test_pace_supernode_short_sleeps_are_not_lengthened(restore_flower):
    pace_supernode(0.5)
    started = time.perf_counter()
    start_client_internal.time.sleep(0.01)
    assert time.perf_counter() - started < 0.3


def test_pace_supernode_twice_changes_nothing_more(restore_flower):
    assert pace_supernode(0.2) is True
    paced, pulls = start_client_internal.time, start_client_internal.pull_objects
    assert pace_supernode(0.05) is False
    assert start_client_internal.time is paced
    assert start_client_internal.pull_objects is pulls


def _never_uploaded(object_id: str) -> bytes:
    """A reply's array its site announced and never uploaded (it died meanwhile)."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    raise ObjectUnavailableError(object_id)


def test_the_serverapps_array_fetch_gives_up_at_the_exchanges_deadline(
    restore_flower,
):
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

    assert bound_serverapp_pulls(prompt=True) is True
    started = time.monotonic()
    with pulls_end_by(started + 0.2), pytest.raises(ObjectPullError):
        http_grid.pull_objects(["ab" * 32], _never_uploaded)
    took = time.monotonic() - started
    # Flower's own retries (500 tries) would wait minutes; the grace is the floor.
    assert LATE_PULL_GRACE_S <= took < LATE_PULL_GRACE_S + 3, took


def test_bounded_pulls_are_prompt_or_flowers_own_and_patched_once(restore_flower):
    assert bound_serverapp_pulls(prompt=True) is True
    bounded = http_grid.pull_objects
    assert _is_prompt(bounded.args[0])
    assert bound_serverapp_pulls(prompt=True) is False  # already bound: left alone
    assert http_grid.pull_objects is bounded

    http_grid.pull_objects = pull_objects
    assert bound_serverapp_pulls(prompt=False) is True
    assert http_grid.pull_objects.args == (pull_objects,)


def test_prompt_object_pulls_leaves_another_pull_objects_alone():
    def other(*args, **kwargs):
        return None

    module = types.ModuleType("fake_flower_module")
    module.pull_objects = other
    assert prompt_object_pulls(module) is False
    assert module.pull_objects is other

    empty = types.ModuleType("fake_flower_module_without")
    assert prompt_object_pulls(empty) is False
    assert not hasattr(empty, "pull_objects")


def test_prompt_object_pulls_patches_the_real_one():
    module = types.ModuleType("fake_flower_module")
    module.pull_objects = pull_objects
    assert prompt_object_pulls(module) is True
    assert _is_prompt(module.pull_objects)
