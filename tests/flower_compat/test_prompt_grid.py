"""The prompt Grid: replies collected every ``poll_s``, everything else delegated."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from flwr.serverapp import Grid

from wardround.flower_compat.prompt_grid import PromptGrid


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


def test_replies_that_came_in_while_a_fetch_ran_past_the_deadline_count():
    """A dead site's reply stalls one fetch past the deadline; the others still count."""
    inner = FakeGrid(["dead", "live"], ready=[], after=1)

    def pull(message_ids):
        inner.pulls.append(set(message_ids))
        if len(inner.pulls) == 1:
            time.sleep(0.3)  # fetching the dead site's arrays, past the deadline
            return [_reply("dead")]  # as Flower's error reply for it
        return [_reply("live")] if "live" in message_ids else []

    inner.pull_messages = pull
    replies = list(
        PromptGrid(inner, poll_s=0.001).send_and_receive(["a", "b"], timeout=0.1)
    )
    assert [r.metadata.reply_to_message_id for r in replies] == ["dead", "live"]
    assert len(inner.pulls) == 2


def test_the_exchanges_deadline_is_set_while_it_fetches():
    from wardround.flower_compat import pacing

    inner = FakeGrid(["m1"], ready=["m1"], after=1)
    seen = []
    original = inner.pull_messages

    def pull(message_ids):
        seen.append(getattr(pacing._exchange, "deadline", None))
        return original(message_ids)

    inner.pull_messages = pull
    before = time.monotonic()
    PromptGrid(inner, poll_s=0.001).send_and_receive(["a"], timeout=5)
    assert len(seen) == 1 and before + 5 <= seen[0] <= time.monotonic() + 5
    assert getattr(pacing._exchange, "deadline", None) is None  # unset afterwards
