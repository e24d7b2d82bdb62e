"""The `wardround audit` command: show, filter, merge and verify audit logs."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from wardround.common.errors import DataError
from wardround.ops.audit import AuditLog
from wardround.ops.audit_cli import audit_command

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, like the real `wardround` app
    app.command("audit")(audit_command)
    return app


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


# -- the command -----------------------------------------------------------------
@pytest.fixture
def two_logs(tmp_path):
    coordinator = AuditLog(tmp_path / "coord" / "audit.jsonl", "coordinator")
    site = AuditLog(tmp_path / "site-a" / "audit.jsonl", "site:a")
    steps = [
        lambda: coordinator.record("run_started", run_id="r1", sites=["a", "b"]),
        lambda: site.record("site_joined", site="a", address="127.0.0.1:9092"),
        lambda: coordinator.record(
            "round_finished", run_id="r1", server_round=1, bytes_by_site={"a": 10}
        ),
        lambda: site.record(
            "error", run_id="r1", site="a", reason="[DataError] bad column"
        ),
        lambda: coordinator.record("run_finished", run_id="r1"),
    ]
    for step in steps:
        step()
        # stamps have millisecond resolution; events in one millisecond keep file order
        time.sleep(0.002)
    return coordinator.path, site.path


def test_cli_table_merges_logs_by_time(two_logs):
    coordinator, site = two_logs
    result = runner.invoke(_app(), ["audit", str(coordinator.parent), str(site)])
    assert result.exit_code == 0, result.output
    order = [
        result.output.index(name)
        for name in (
            "run_started",
            "site_joined",
            "round_finished",
            "error",
            "run_finished",
        )
    ]
    assert order == sorted(order)
    assert "[DataError]" in result.output  # shown as text, not eaten as markup
    assert "server_round=1" in result.output


def test_cli_json_filters(two_logs):
    coordinator, site = two_logs
    result = runner.invoke(
        _app(),
        ["audit", str(coordinator), str(site), "--json", "--site", "a",
         "--event", "run_started,error"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines()]
    assert [e["event"] for e in events] == ["run_started", "error"]
    assert events[1]["actor"] == "site:a"


def test_cli_since_and_until(two_logs):
    coordinator, _ = two_logs
    future = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    result = runner.invoke(
        _app(), ["audit", str(coordinator), "--json", "--since", future]
    )
    assert result.exit_code == 0 and result.output == ""
    result = runner.invoke(
        _app(), ["audit", str(coordinator), "--json", "--until", future]
    )
    assert len(result.output.splitlines()) == 3


def test_cli_verify_exit_codes(two_logs):
    coordinator, site = two_logs
    result = runner.invoke(_app(), ["audit", "--verify", str(coordinator), str(site)])
    assert result.exit_code == 0, result.output
    assert result.output.count("chain intact") == 2

    lines = _lines(coordinator)
    del lines[1]
    coordinator.write_text("".join(lines))
    result = runner.invoke(_app(), ["audit", "--verify", str(coordinator), str(site)])
    assert result.exit_code == DataError.exit_code == 3
    assert f"{coordinator}: line 2" in result.output

    shown = runner.invoke(_app(), ["audit", str(coordinator)])
    assert shown.exit_code == 0
    assert "fails verification at line 2" in shown.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--event", "patient_admitted"], "unknown audit event"),
        (["--since", "yesterday"], "not an ISO-8601"),
        (["--until", "2025-13-45"], "not an ISO-8601"),
    ],
)
def test_cli_bad_options_exit_2(two_logs, args, message):
    result = runner.invoke(_app(), ["audit", str(two_logs[0]), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_missing_log_exits_2(tmp_path):
    result = runner.invoke(_app(), ["audit", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "no audit log at" in result.output
    result = runner.invoke(_app(), ["audit", str(tmp_path)])
    assert result.exit_code == 2
    assert "no audit.jsonl in folder" in result.output
