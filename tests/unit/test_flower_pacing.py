"""Flower pacing: the patch points in the installed Flower, and the prompt Grid."""

from __future__ import annotations

import functools
import time
import types
from types import SimpleNamespace

import pytest
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal

from wardround.common.flower_pacing import (
    OBJECT_POLL_CAP_S,
    OBJECT_POLL_S,
    pace_serverapp_grid,
    pace_supernode,
    prompt_object_pulls,
)
from wardround.server.prompt_grid import PromptGrid


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


def test_pace_serverapp_grid_prompts_the_grids_pulls(restore_flower):
    assert pace_serverapp_grid() is True
    assert _is_prompt(http_grid.pull_objects)
    assert pace_serverapp_grid() is False  # already paced: left as it is
    assert _is_prompt(http_grid.pull_objects)


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


# ------------------------------------------------------------------ PromptGrid


def _reply(to: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to))


class FakeGrid:
    """A Grid-like object: replies for ``ready`` ids appear from the ``after``-th pull."""

    def __init__(self, ids: list[str], ready: list[str], after: int = 3) -> None:
        self.ids = ids
        self.ready = ready
        self.after = after
        self.pushed: list[list] = []
        self.pulls: list[set[str]] = []
        self.closed = False
        self.run_id = None

    def push_messages(self, messages):
        self.pushed.append(list(messages))
        return list(self.ids)

    def pull_messages(self, message_ids):
        self.pulls.append(set(message_ids))
        if len(self.pulls) < self.after:
            return []
        return [_reply(i) for i in self.ready if i in message_ids]

    def get_node_ids(self):
        return [11, 22]

    def create_message(self, *args, **kwargs):
        return ("created", args, kwargs)

    def set_run(self, run_id):
        self.run_id = run_id

    @property
    def run(self):
        return SimpleNamespace(run_id=self.run_id)

    def close(self):
        self.closed = True


def test_prompt_grid_returns_every_reply():
    inner = FakeGrid(["m1", "m2"], ready=["m1", "m2"], after=3)
    grid = PromptGrid(inner, poll_s=0.001)
    assert isinstance(grid, Grid)
    started = time.perf_counter()
    replies = list(grid.send_and_receive(["msg-1", "msg-2"]))
    assert time.perf_counter() - started < 1.0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2"]
    assert inner.pushed == [["msg-1", "msg-2"]]
    assert len(inner.pulls) == 3
    assert inner.pulls[0] == {"m1", "m2"}


def test_prompt_grid_only_asks_for_what_is_still_missing():
    inner = FakeGrid(["m1", "m2"], ready=["m1"], after=1)
    late = {"m2"}

    original = inner.pull_messages

    def pull(message_ids):
        replies = original(message_ids)
        if len(inner.pulls) == 3 and late & set(message_ids):
            replies.append(_reply("m2"))
        return replies

    inner.pull_messages = pull
    replies = list(
        PromptGrid(inner, poll_s=0.001).send_and_receive(["a", "b"], timeout=5)
    )
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m2"]
    assert inner.pulls == [{"m1", "m2"}, {"m2"}, {"m2"}]


def test_prompt_grid_stops_at_the_timeout_with_partial_replies():
    inner = FakeGrid(["m1", "m2"], ready=["m1"], after=3)
    grid = PromptGrid(inner, poll_s=0.005)
    started = time.perf_counter()
    replies = list(grid.send_and_receive(["a", "b"], timeout=0.1))
    elapsed = time.perf_counter() - started
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
    assert 0.1 <= elapsed < 1.0
    assert len(inner.pulls) >= 3


def test_prompt_grid_with_a_zero_timeout_pulls_once():
    inner = FakeGrid(["m1"], ready=["m1"], after=3)
    assert (
        list(PromptGrid(inner, poll_s=0.001).send_and_receive(["a"], timeout=0)) == []
    )
    assert len(inner.pulls) == 1


def test_prompt_grid_with_nothing_pushed_returns_at_once():
    inner = FakeGrid([], ready=[])
    assert list(PromptGrid(inner).send_and_receive([])) == []
    assert inner.pulls == []


def test_prompt_grid_delegates_the_rest():
    inner = FakeGrid(["m1"], ready=["m1"])
    grid = PromptGrid(inner)
    assert list(grid.get_node_ids()) == [11, 22]
    assert grid.create_message("content", "train", 11, "1", ttl=5) == (
        "created",
        ("content", "train", 11, "1"),
        {"ttl": 5},
    )
    grid.set_run(7)
    assert inner.run_id == 7 and grid.run.run_id == 7
    assert grid.push_messages(["x"]) == ["m1"]
    assert list(grid.pull_messages(["m1"])) == []  # first pull: nothing yet
    grid.close()  # not part of Grid: reaches the inner one through __getattr__
    assert inner.closed
    with pytest.raises(AttributeError):
        grid.no_such_method  # noqa: B018
