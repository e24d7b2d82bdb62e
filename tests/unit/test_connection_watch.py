"""The site daemon's reading of the SuperNode's log: what the operator is told."""

from __future__ import annotations

from wardround.client.connection_watch import ConnectionWatch

FAILED = "WARNING :   Connection attempt failed, retrying in 1.00 seconds\n"
REGISTERED = "INFO :      SuperNode ID: 42\n"
RECOVERED = "INFO :      Connection successful after 9.00 seconds and 5 tries.\n"


def _watch() -> ConnectionWatch:
    return ConnectionWatch(
        "coord.example:9092", "/state/supernode.log", first_warning_s=15
    )


def test_a_first_connection_is_announced_once():
    watch = _watch()
    assert watch.feed(REGISTERED, now=1.0) == [
        "connected to the coordinator at coord.example:9092"
    ]
    # a SuperNode restarted by the daemon registers again: nothing new to say
    assert watch.feed(REGISTERED, now=50.0) == []


def test_failures_are_reported_after_a_while_then_at_growing_intervals():
    watch = _watch()
    assert watch.feed(FAILED, now=0.0) == []
    assert watch.feed(FAILED * 3, now=14.0) == []
    first = watch.feed("", now=15.5)
    assert len(first) == 1
    assert (
        "coord.example:9092 has not answered for 16 s (4 failed attempts)" in first[0]
    )
    assert "/state/supernode.log" in first[0]
    assert watch.feed(FAILED, now=20.0) == []  # not again before twice as long
    assert watch.feed("", now=31.0) != []
    assert watch.feed("", now=40.0) == []
    # the gap grows, and never beyond the longest gap
    watch.feed("", now=5000.0)
    assert watch.feed("", now=5000.0 + 599) == []
    assert watch.feed("", now=5000.0 + 601) != []


def test_a_recovery_is_announced_only_when_a_failure_was():
    watch = _watch()
    watch.feed(REGISTERED, now=0.0)
    # short hiccup: retried and recovered before any warning
    assert watch.feed(FAILED + RECOVERED, now=5.0) == []
    watch.feed(FAILED, now=10.0)
    assert watch.feed("", now=30.0)[0].startswith(
        "the coordinator at coord.example:9092 has not answered since it connected"
    )
    assert watch.feed(RECOVERED, now=40.0) == [
        "the coordinator at coord.example:9092 answers again after 30 s of failed "
        "attempts"
    ]
    # and the next outage starts from the first warning's delay again
    watch.feed(FAILED, now=100.0)
    assert watch.feed("", now=114.0) == []
    assert watch.feed("", now=116.0) != []


def test_a_coordinator_that_comes_up_late_is_announced_with_the_wait():
    watch = _watch()
    watch.feed(FAILED * 5, now=0.0)
    assert watch.feed("", now=20.0) != []
    assert watch.feed(RECOVERED + REGISTERED, now=25.0) == [
        "connected to the coordinator at coord.example:9092 after 25 s of failed "
        "attempts"
    ]


def test_the_debug_lines_of_a_try_count_once():
    watch = _watch()
    debug = "DEBUG :     Connection attempt failed with exception: ConnectError\n"
    watch.feed((debug + FAILED) * 3, now=0.0)
    assert "(3 failed attempts)" in watch.feed("", now=16.0)[0]


def test_a_line_naming_a_connection_event_inside_other_text_is_not_one():
    """Flower logs each message's group id, which the coordinator chooses."""
    watch = _watch()
    watch.feed(REGISTERED, now=0.0)
    forged = (
        "INFO :      [RUN 42, ROUND Connection attempt failed, retrying in 1.00 "
        "seconds]\n"
    )
    assert watch.feed(forged * 5, now=1.0) == []
    assert watch.feed("", now=100.0) == []  # no "has not answered" warning
    assert watch.failures == 0
    fresh = _watch()
    assert fresh.feed("INFO :      [RUN 1, ROUND SuperNode ID: 7]\n", now=1.0) == []
    assert not fresh.connected_once


def test_flowers_coloured_lines_are_read():
    watch = _watch()
    coloured = "\x1b[92mINFO \x1b[0m:      SuperNode ID: 42\n"
    assert watch.feed(coloured, now=1.0)[0].startswith("connected to the coordinator")


def test_lines_with_flowers_timestamps_are_read():
    watch = _watch()
    stamped = "INFO 2026-12-07 19:00:01,123:      SuperNode ID: 42\n"
    assert watch.feed(stamped, now=1.0)[0].startswith("connected to the coordinator")
