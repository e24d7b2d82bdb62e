"""A site's log: policy refusals in one line, Flower's DEBUG lines hidden without -v."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from egress_helpers import _context, _message
from typer.testing import CliRunner

from wardround.cli import app
from wardround.client import daemon
from wardround.client.egress_mods import error_sanitizing_mod
from wardround.common.errors import (
    AnswerRefused,
    EgressViolation,
    PolicyRefusal,
    PrivacyBudgetExhausted,
    PrivacyPolicyRefused,
    SecureAggregationRefused,
)
from wardround.flower_compat.constants import ErrorCode

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.mark.parametrize(
    "refusal",
    [
        AnswerRefused("the run allows 3 evaluations; this is the 4th"),
        PrivacyBudgetExhausted("epsilon 8.0 of 8.0 is spent", hint="Raise it."),
        PrivacyPolicyRefused("the run's epsilon 20 is above the site's 10"),
        SecureAggregationRefused("2 participants; the site approved at least 3"),
    ],
)
def test_a_policy_refusal_is_one_warning_line_without_a_traceback(caplog, refusal):
    def refuse(msg, ctx):
        raise refusal

    with caplog.at_level(logging.DEBUG, logger="wardround.egress"):
        reply = error_sanitizing_mod(_message("evaluate"), _context(), refuse)

    assert isinstance(refusal, PolicyRefusal)
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    [record] = [r for r in caplog.records if r.name == "wardround.egress"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None and "Traceback" not in caplog.text
    said = record.getMessage()
    assert "\n" not in said
    assert refusal.message in said and refusal.title in said
    if refusal.hint:
        assert refusal.hint in said


@pytest.mark.parametrize(
    "failure",
    [
        KeyError("no such column"),
        # the site's own reply broke its egress rules: a fault to trace, not a policy
        EgressViolation("the reply holds an unlisted tensor"),
    ],
)
def test_an_unexpected_failure_keeps_its_traceback(caplog, failure):
    def fail(msg, ctx):
        raise failure

    with caplog.at_level(logging.DEBUG, logger="wardround.egress"):
        error_sanitizing_mod(_message("train"), _context(), fail)

    [record] = [r for r in caplog.records if r.name == "wardround.egress"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "handler failed" in record.getMessage()


@pytest.fixture
def flower_logger():
    """Flower's logger, with its level put back after the test."""
    from wardround.flower_compat.flower_logging import quiet_flower

    flower = logging.getLogger("flwr")
    saved, handlers = flower.level, list(flower.handlers)
    quiet_flower(logging.DEBUG)  # loads Flower's logger, at the level Flower sets
    yield flower
    flower.setLevel(saved)
    for handler in handlers:
        flower.addHandler(handler)


def _start_a_daemon_that_logs(monkeypatch, tmp_path, *options: str):
    flower = logging.getLogger("flwr")  # what Flower's own `log` writes to

    def fake_daemon(plan, stop, report=None, on_locked=None):
        flower.debug("Node 7: stage 0 completes. uploading public keys...")
        flower.error("the SuperLink refused the connection")

    plan = SimpleNamespace(
        site=SimpleNamespace(site=SimpleNamespace(name="site-01")),
        coordinator="127.0.0.1:9092",
        state_dir=tmp_path,
    )
    monkeypatch.setattr(daemon, "plan_site", lambda config: plan)
    monkeypatch.setattr(daemon, "run_site_daemon", fake_daemon)
    monkeypatch.setattr("signal.signal", lambda *args: None)
    result = CliRunner().invoke(
        app, [*options, "site", "start", "--config", str(tmp_path / "site.toml")]
    )
    assert result.exit_code == 0, result.output


def test_the_site_daemon_hides_flowers_debug_lines_without_verbose(
    monkeypatch, tmp_path, caplog, flower_logger
):
    with caplog.at_level(logging.DEBUG):
        _start_a_daemon_that_logs(monkeypatch, tmp_path)

    flower_lines = {
        r.levelno: r.getMessage() for r in caplog.records if r.name == "flwr"
    }
    assert logging.DEBUG not in flower_lines
    assert "refused the connection" in flower_lines[logging.ERROR]  # errors still show


def test_the_site_daemon_shows_flowers_debug_lines_with_verbose(
    monkeypatch, tmp_path, caplog, flower_logger
):
    with caplog.at_level(logging.DEBUG):
        _start_a_daemon_that_logs(monkeypatch, tmp_path, "--verbose")

    flower_lines = {
        r.levelno: r.getMessage() for r in caplog.records if r.name == "flwr"
    }
    assert "stage 0 completes" in flower_lines[logging.DEBUG]


def _consoles(logger: logging.Logger) -> list[logging.Handler]:
    return [
        h
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
    ]


def test_the_site_daemon_prints_each_flower_line_once(
    monkeypatch, tmp_path, flower_logger
):
    # Flower's own console handler, and the root logger's: every warning twice
    assert _consoles(flower_logger) and flower_logger.propagate
    _start_a_daemon_that_logs(monkeypatch, tmp_path)

    assert not _consoles(flower_logger) and flower_logger.propagate
