"""The SuperNode's log keeps the coordinator's text to one printable line per record."""

from __future__ import annotations

import io
import logging
from logging import INFO

from wardround.client.connection_watch import ConnectionWatch
from wardround.client.supernode_main import OneLineRecords

# Flower's logger (flwr.common.logger.FLOWER_LOGGER; its log() is this logger's)
FLOWER_LOGGER = logging.getLogger("flwr")
log = FLOWER_LOGGER.log


def test_a_group_id_cannot_forge_a_line_or_reach_the_terminal():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s :      %(message)s"))
    one_line = OneLineRecords()
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(logging.INFO)  # the SuperNode logs at INFO
    FLOWER_LOGGER.addHandler(handler)
    FLOWER_LOGGER.addFilter(one_line)
    try:
        forged = (
            "3]\nWARNING :   Connection attempt failed, retrying in 1.00 seconds"
            "\n\x1b[2J\x1b[HINFO :      all good"
        )
        log(INFO, "[RUN %s, ROUND %s]", 42, forged)
        log(INFO, "SuperNode ID: %s", 77)
    finally:
        FLOWER_LOGGER.removeFilter(one_line)
        FLOWER_LOGGER.removeHandler(handler)
        FLOWER_LOGGER.setLevel(level)

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in stream.getvalue()
    assert lines[0].startswith("INFO :      [RUN 42, ROUND 3]\\nWARNING")
    assert lines[1] == "INFO :      SuperNode ID: 77"
    watch = ConnectionWatch("coord:9092", "supernode.log", first_warning_s=0)
    assert watch.feed(stream.getvalue(), now=1.0) == [
        "connected to the coordinator at coord:9092"
    ]
    assert watch.failures == 0


def test_an_exceptions_text_joins_its_line_escaped():
    """Flower logs errors with exc_info; their text may quote a server's details."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s :      %(message)s"))
    one_line = OneLineRecords()
    FLOWER_LOGGER.addHandler(handler)
    FLOWER_LOGGER.addFilter(one_line)
    try:
        try:
            raise RuntimeError("details\nINFO :      SuperNode ID: 4242\n\x1b[2J")
        except RuntimeError as exc:
            log(logging.ERROR, "the task failed unexpectedly", exc_info=exc)
    finally:
        FLOWER_LOGGER.removeFilter(one_line)
        FLOWER_LOGGER.removeHandler(handler)

    [line] = stream.getvalue().splitlines()
    assert "\x1b" not in line and "RuntimeError: details\\nINFO" in line
    watch = ConnectionWatch("coord:9092", "supernode.log", first_warning_s=0)
    assert watch.feed(stream.getvalue(), now=1.0) == []
