"""Sites that are late, never show up or go silent.

Real site ClientApps on an in-process grid, with tiny timeouts; the coordinator's
deployment mode is in test_site_wait_deployment.py.
"""

import json
import time

import pytest
from site_wait_helpers import FAST
from site_wait_helpers import late as _late
from site_wait_helpers import local_grid as _grid

from wardround.server.federation import run_federation
from wardround.server.site_wait import SiteWait


@pytest.fixture(scope="module")
def config(synthetic_sites, tiny_config):
    return tiny_config.with_overrides(
        data={"sites_dir": str(synthetic_sites)},
        train={"max_steps": 1},
        federation={"rounds": 1, "min_sites": 2, **FAST},
        privacy={"enabled": False},
        secure_aggregation={"enabled": False},
    )


class Recorder:
    """An observer that keeps every call, and status.json when the run pauses."""

    def __init__(self, run_dir=None):
        self.calls = []
        self.run_dir = run_dir
        self.paused_status = None

    def on_start(self, total_rounds):
        self.calls.append(("on_start", total_rounds))

    def on_round(self, record):
        self.calls.append(("on_round", record.round))

    def on_paused(self, reason):
        self.calls.append(("on_paused", reason))
        self.paused_status = json.loads((self.run_dir / "status.json").read_text())

    def on_resumed(self):
        self.calls.append(("on_resumed",))

    def on_finished(self, state, reason):
        self.calls.append(("on_finished", state, reason))

    def hooks(self):
        return [c[0] for c in self.calls]


# -- end to end: a run that waits ----------------------------------------------
def test_a_run_pauses_while_too_few_sites_are_connected_and_then_completes(
    config, tmp_path
):
    run_dir = tmp_path / "run"
    grid = _grid(config)
    asked = _late(grid, present=1, calls=4)
    observer = Recorder(run_dir)

    result = run_federation(grid, config, run_dir=run_dir, observer=observer)

    assert asked["n"] > 4
    assert observer.paused_status["state"] == "paused"
    assert observer.paused_status["reason"] == (
        "waiting for sites: 1 connected, the run needs at least 2 "
        "(federation.min-sites)"
    )
    assert observer.paused_status["round"] == 0
    assert observer.hooks() == [
        "on_start",
        "on_paused",
        "on_resumed",
        "on_round",
        "on_finished",
    ]
    assert len(result.rounds[1].train) == 2
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["reason"] is None
    assert set(status) == {"state", "round", "rounds", "reason", "updated", "run_id"}
    assert status["run_id"] == result.summary["run_id"]


def test_a_round_goes_ahead_without_an_expected_site_that_does_not_come(
    config, tmp_path, caplog
):
    expecting = config.with_overrides(federation={"expected_sites": 3})
    started = time.monotonic()
    result = run_federation(_grid(expecting), expecting, run_dir=tmp_path / "run")
    # round 0 and round 1 each waited the join timeout for the third site
    assert time.monotonic() - started >= 2 * FAST["join_timeout_s"]
    assert len(result.rounds) == 2 and len(result.rounds[1].train) == 2
    assert "goes ahead with 2 of 3 expected site(s)" in caplog.text


def test_a_connected_site_that_never_replies_is_recorded_and_the_round_goes_on(
    three_sites, tiny_config, tmp_path
):
    config = tiny_config.with_overrides(
        data={"sites_dir": str(three_sites)},
        train={"max_steps": 1},
        federation={"rounds": 1, "min_sites": 2, **FAST},
        privacy={"enabled": False},
        secure_aggregation={"enabled": False},
    )

    def silent(node, msg):  # hangs on its first training message
        return node == 1002 and msg.metadata.message_type == "train"

    result = run_federation(
        _grid(config, sites=3, vanish=silent), config, run_dir=tmp_path / "run"
    )
    round_one = result.rounds[1]
    assert sorted(t.node_id for t in round_one.train) == [1000, 1001]
    [failure] = round_one.failures
    assert (failure.node_id, failure.phase, failure.kind) == (1002, "train", None)
    assert failure.reason.startswith("no reply within federation.round-timeout-s")


# -- SiteWait alone, on a fake clock -------------------------------------------
class FakeGrid:
    def __init__(self, answers):
        self.answers = list(answers)

    def get_node_ids(self):
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def _wait(answers, *, expected=2, min_sites=2, timeout=120.0, **kw):
    clock = FakeClock()
    events = []
    wait = SiteWait(
        grid=FakeGrid(answers),
        expected=expected,
        min_sites=min_sites,
        join_timeout_s=timeout,
        on_paused=lambda reason: events.append(("paused", reason)),
        on_resumed=lambda: events.append(("resumed",)),
        sleep=clock.sleep,
        clock=clock,
        **kw,
    )
    return wait, clock, events


def test_the_wait_returns_at_once_when_the_expected_sites_are_there():
    wait, clock, events = _wait([[1, 2]])
    assert wait.before_round(1) == [1, 2]
    assert clock.sleeps == [] and events == []


def test_the_wait_gives_late_sites_the_join_timeout_then_goes_ahead(caplog):
    wait, clock, events = _wait(
        [[1, 2]],
        expected=3,
        name_of=lambda node, index: f"site-{node}",
        expected_nodes=(1, 2, 3),
    )
    assert wait.before_round(4) == [1, 2]
    assert clock.now == pytest.approx(120.0)
    assert max(clock.sleeps) <= 1.0  # polls about every second
    assert events == []
    assert "round 4 goes ahead with 2 of 3" in caplog.text
    assert "missing: site-3" in caplog.text


def test_the_wait_pauses_below_min_sites_and_resumes_when_they_are_back():
    answers = [[1]] * 130 + [[1, 2]]  # 120 one-second polls, then ~5 paused ones
    wait, clock, events = _wait(answers)
    assert wait.before_round(1) == [1, 2]
    assert events == [
        (
            "paused",
            "waiting for sites: 1 connected, the run needs at least 2 "
            "(federation.min-sites)",
        ),
        ("resumed",),
    ]
    paused_polls = [s for s in clock.sleeps if s == 2.0]
    assert paused_polls and max(clock.sleeps) <= 2.0  # at most every 2 s


def test_ensure_min_only_pauses_below_min_sites():
    wait, clock, events = _wait([[1, 2]], expected=5)
    assert wait.ensure_min() == [1, 2] and clock.sleeps == []
    wait, clock, events = _wait([[1], [1], [1, 2]])
    assert wait.ensure_min() == [1, 2]
    assert [e[0] for e in events] == ["paused", "resumed"]
