"""The site's dashboard: its pages and /metrics over a ledger, approvals and egress log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from typer.testing import CliRunner

from wardround.cli import app as cli_app
from wardround.client.approvals import AppApprovals
from wardround.client.dashboard.app import build_app as site_app
from wardround.client.dashboard.state import SiteSource, privacy_report
from wardround.client.egress_log import record_egress
from wardround.client.ledger import PrivacyLedger, ledger_file
from wardround.common.privacy import Mechanism
from wardround.dashboard.web import Exposure
from wardround.ops.audit import AuditLog
from wardround.sitedata.site_config import SiteConfig

LOOPBACK = Exposure(host="127.0.0.1", port=9101)
LOCAL = "http://127.0.0.1:9101"


@pytest.fixture
def site(tmp_path: Path) -> SiteConfig:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "site.toml").write_text(
        '[site]\nname = "site-07"\n[privacy]\nbudget-epsilon = 40.0\n'
        '[deployment]\nstate-dir = "state"\n[dashboard]\nport = 9101\n'
    )
    site = SiteConfig.from_toml(folder / "site.toml")
    site.state_path.mkdir()
    ledger = PrivacyLedger(ledger_file(site.ledger_path))
    for run, rounds in (("run-a", 2), ("run-b", 1)):
        for r in range(1, rounds + 1):
            entry = ledger.reserve(
                run, r, Mechanism(1.0, 0.1, 50), delta=1e-5, max_grad_norm=1.0,
                accountant="rdp", base_model="base",
            )  # fmt: skip
            ledger.commit(entry, 50, epsilon_run=1.0, epsilon_total=1.0)
    AppApprovals(site.state_path).approve(
        "a" * 64, note="ward study", settings=["[privacy]", "  target-epsilon = 8.0"]
    )
    AppApprovals(site.state_path).approve("b" * 64)
    record_egress(
        site.state_path / "egress.jsonl", run_id="77", server_round=1, message_type="train",
        ok=True, bytes_in=900, bytes_out=4096, seconds=2.5,
        tensors=["delta/fusion.lora_A", "delta/head.weight"], metrics={"train-loss": 0.61, "dp-epsilon-run": 1.2},
    )  # fmt: skip
    AuditLog(site.state_path / "audit.jsonl", actor="site:site-07").record(
        "app_refused", fab_hash="c" * 64, reason="not approved"
    )
    return site


def test_the_site_pages_show_the_ledger_as_site_privacy_json_does(site):
    report = {"config": "site.toml", "can_train": True, "blocking": [], "warnings": []}
    client = TestClient(
        site_app(SiteSource(site=site, check=lambda: dict(report)), LOOPBACK),
        base_url=LOCAL,
    )
    cli = CliRunner().invoke(
        cli_app,
        ["site", "privacy", "--config", str(site.base_dir / "site.toml"), "--json"],
    )
    assert cli.exit_code == 0, cli.output
    expected = json.loads(cli.output)
    assert expected == privacy_report(site)

    page = client.get("/privacy").text
    assert f'id="epsilon-total">{expected["epsilon_total"]:.3f}<' in page
    for run, eps in expected["runs"].items():
        assert (
            f'<tr data-run="{run}"><td>{run}</td><td class="num epsilon">{eps:.3f}</td>'
            in page
        )
    assert 'lifetime budget ε</th><td class="num">40<' in page

    approvals = client.get("/approvals").text
    assert "target-epsilon = 8.0" in approvals and "ward study" in approvals
    assert "Approved as a bare hash" in approvals
    record_egress(  # a SecAgg+ stage, filed under the run's name and its Flower id
        site.state_path / "egress.jsonl", run_id="20261208-run", flower_run_id=77,
        server_round=1, message_type="train", ok=True, bytes_in=10, bytes_out=0,
        seconds=0.1, tensors=[], metrics={},
    )  # fmt: skip
    sent = client.get("/sent").text
    assert (
        "delta/fusion.lora_A" in sent
        and "4.0 KiB" in sent
        and "train-loss=0.61<" in sent
    )
    # the coordinator's name, and the site's own record of the Flower run
    assert sent.count("(Flower run 77)") == 1 and "Flower run )" not in sent
    assert "This site can train." in client.get("/check").text
    assert "app_refused" in client.get("/audit").text

    families = {
        f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)
    }
    assert families["wardround_site_epsilon_spent"].samples[0].value == pytest.approx(
        expected["epsilon_total"]
    )
    assert families["wardround_site_epsilon_budget"].samples[0].value == 40.0
    assert {
        s.labels["run"]: s.value for s in families["wardround_site_run_epsilon"].samples
    } == pytest.approx(expected["runs"])
    assert families["wardround_site_bytes_sent"].samples[0].value == 4096
    refused = {
        s.labels["event"]: s.value for s in families["wardround_site_refusals"].samples
    }
    assert refused["app_refused"] == 1


def test_wardround_dashboard_serves_a_site_from_its_site_toml(site):
    from wardround.dashboard_cli import _app

    app, what = _app(None, None, site.base_dir / "site.toml", [], LOOPBACK, 5)
    assert what == "site site-07"
    page = TestClient(app, base_url=LOCAL).get("/privacy").text
    assert f'id="epsilon-total">{privacy_report(site)["epsilon_total"]:.3f}<' in page


def test_metrics_count_what_was_appended_since_the_last_scrape(site):
    """/metrics keeps its place in the logs and still counts every new line."""
    client = TestClient(
        site_app(SiteSource(site=site, check=lambda: {"can_train": True}), LOOPBACK),
        base_url=LOCAL,
    )

    def scrape() -> dict:
        return {
            f.name: f
            for f in text_string_to_metric_families(client.get("/metrics").text)
        }

    first = scrape()
    assert first["wardround_site_bytes_sent"].samples[0].value == 4096
    record_egress(
        site.state_path / "egress.jsonl", run_id="77", server_round=2, message_type="train",
        ok=True, bytes_in=900, bytes_out=1000, seconds=1.5, tensors=[], metrics={},
    )  # fmt: skip
    AuditLog(site.state_path / "audit.jsonl", actor="site:site-07").record(
        "answer_refused", reason="over the per-run cap"
    )
    second = scrape()
    assert second["wardround_site_bytes_sent"].samples[0].value == 5096
    tasks = {
        (s.labels["message_type"], s.labels["ok"]): s.value
        for s in second["wardround_site_tasks"].samples
        if s.name == "wardround_site_tasks_total"
    }
    assert tasks == {("train", "true"): 2}
    durations = {
        s.name: s.value for s in second["wardround_site_task_duration_seconds"].samples
    }
    assert durations["wardround_site_task_duration_seconds_count"] == 2
    assert durations["wardround_site_task_duration_seconds_sum"] == 4.0
    refused = {
        s.labels["event"]: s.value for s in second["wardround_site_refusals"].samples
    }
    assert refused == {"app_refused": 1, "answer_refused": 1}
