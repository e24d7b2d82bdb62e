"""`--run` follows one run across the coordinator's and the sites' audit logs.

The lines below are the identifiers each writer really records: the admin's
launch and resume lines (run name, Flower run id, app hash), the ServerApp's
lines (run name), a site daemon's task lines (Flower run id as ``run_id``, the
app hash on ``run_started``), a site's answers (``flower_run``, ``ledger_run``)
and a site's approvals (app hash only).
"""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from wardround.ops.audit import AuditLog, filter_events
from wardround.ops.audit_cli import audit_command
from wardround.ops.audit_query import run_identifiers

APP = "4f37e74c" + "ab" * 28
OTHER_APP = "9c0ffee1" + "cd" * 28
NAME = "20261207-040131-4f37e74c"
RELAUNCH = "20261208-090000-4f37e74c"  # the same app, launched again
OTHER = "20261207-050000-9c0ffee1"
FIRST, RESUMED, RELAUNCHED, UNRELATED = (
    "11056182493341478792",
    "2208",
    "3301",
    "4404",
)
LEDGER = "a1" * 16  # one approved app is one run in the site's ledger

COORDINATOR = [
    {"event": "coordinator_started", "port": 9092},
    {"event": "run_started", "run_id": NAME, "flower_run_id": FIRST, "fab_hash": APP},
    {"event": "run_started", "run_id": NAME, "rounds": 2},
    {"event": "site_joined", "run_id": NAME, "site": "site-01"},
    {"event": "round_finished", "run_id": NAME, "round": 1},
    {"event": "run_resumed", "run_id": NAME, "flower_run_id": RESUMED},
    {"event": "run_finished", "run_id": NAME, "round": 2},
    {"event": "run_started", "run_id": RELAUNCH, "flower_run_id": RELAUNCHED},
    {"event": "run_started", "run_id": RELAUNCH, "rounds": 1},
    {"event": "run_started", "run_id": OTHER, "flower_run_id": UNRELATED},
]
SITE = [
    {"event": "site_daemon_started", "coordinator": "127.0.0.1:9092"},
    {"event": "app_approved", "fab_hash": APP},
    {"event": "app_approved", "fab_hash": OTHER_APP},
    {"event": "run_started", "run_id": FIRST, "fab_hash": APP},
    {"event": "answer_sent", "flower_run": int(FIRST), "ledger_run": LEDGER},
    {"event": "round_finished", "run_id": FIRST, "round": 1},
    {"event": "privacy_spent", "run_id": FIRST, "round": 1},
    {"event": "run_started", "run_id": RESUMED, "fab_hash": APP},
    {"event": "answer_sent", "flower_run": int(RESUMED), "ledger_run": LEDGER},
    {"event": "run_started", "run_id": RELAUNCHED, "fab_hash": APP},
    {"event": "answer_sent", "flower_run": int(RELAUNCHED), "ledger_run": LEDGER},
    {"event": "app_refused", "run_id": UNRELATED, "fab_hash": OTHER_APP},
    {"event": "answer_refused", "flower_run": int(UNRELATED), "reason": "refused"},
]
ALL = COORDINATOR + SITE

THE_RUN = [
    line
    for line in ALL
    if NAME in line.values()
    or {FIRST, RESUMED} & {str(value) for value in line.values()}
    or line == {"event": "app_approved", "fab_hash": APP}
]
THE_APP = [
    line
    for line in ALL
    if line in THE_RUN
    or RELAUNCH in line.values()
    or RELAUNCHED in {str(value) for value in line.values()}
]


def test_the_expected_selections_are_what_the_tests_say():
    assert len(THE_RUN) == 13
    assert len(THE_APP) == 17


@pytest.mark.parametrize("run", [NAME, FIRST, RESUMED])
def test_a_run_name_or_any_of_its_flower_ids_selects_the_run_in_both_logs(run):
    assert filter_events(ALL, run=run) == THE_RUN


def test_answers_carrying_flower_run_are_selected_by_the_flower_id():
    shown = filter_events(SITE, run=FIRST)
    assert {"event": "answer_sent", "flower_run": int(FIRST), "ledger_run": LEDGER} in (
        shown
    )
    assert len(shown) == 5  # approval, run_started, answer, round, privacy


def test_without_the_coordinators_log_the_run_name_finds_the_sites_lines_by_app():
    shown = filter_events(SITE, run=NAME)
    assert shown == [line for line in SITE if line in THE_APP]
    assert not any(line.get("fab_hash") == OTHER_APP for line in shown)


@pytest.mark.parametrize("run", [APP, APP[:8], APP[:8].upper(), LEDGER])
def test_an_app_hash_prefix_or_a_ledger_key_selects_every_run_of_the_app(run):
    assert filter_events(ALL, run=run) == THE_APP


def test_a_short_hash_prefix_is_not_taken_for_an_app():
    assert filter_events(ALL, run=APP[:7]) == []


def test_run_identifiers_names_every_identifier_of_the_run():
    found = run_identifiers(ALL, NAME)
    assert found.runs == {NAME, FIRST, RESUMED}
    assert {APP, LEDGER} <= found.apps


def test_cli_run_filter_merges_the_coordinators_and_a_sites_lines(tmp_path):
    coordinator, site = _written_logs(tmp_path, SITE)
    result = CliRunner().invoke(
        _audit_app(),
        ["audit", str(coordinator.path), str(site.path), "--run", NAME, "--json"],
    )
    assert result.exit_code == 0, result.output
    actors = [json.loads(line)["actor"] for line in result.output.splitlines()]
    assert actors.count("coordinator") == 6
    assert actors.count("site:site-01") == 7


def test_site_selects_a_sites_own_lines_and_a_long_flower_id_is_not_an_app():
    own = {"event": "privacy_spent", "actor": "site:site-01", "run_id": FIRST}
    named = {"event": "site_joined", "actor": "coordinator", "site": "site-01"}
    other = {"event": "privacy_spent", "actor": "site:site-02", "run_id": FIRST}

    assert filter_events([own, named, other], site="site-01") == [own, named]
    # an all-digit Flower run id is never read as an app hash prefix
    assert run_identifiers(COORDINATOR + SITE, FIRST).apps.isdisjoint({FIRST})


def test_a_flower_run_of_the_app_no_coordinator_line_names_is_shown_and_said():
    stray = "5505"  # the approved app run by hand (`flwr run`), not by launch
    site = SITE + [
        {"event": "run_started", "run_id": stray, "fab_hash": APP},
        {"event": "answer_sent", "flower_run": int(stray), "ledger_run": LEDGER},
    ]

    found = run_identifiers(COORDINATOR + site, NAME)

    assert found.unclaimed == {stray}
    assert RELAUNCHED not in found.runs  # claimed by its own run name
    shown = filter_events(COORDINATOR + site, run=NAME)
    assert {"event": "answer_sent", "flower_run": int(stray), "ledger_run": LEDGER} in (
        shown
    )


def test_cli_says_which_flower_runs_no_coordinator_line_names(tmp_path):
    stray = [{"event": "run_started", "run_id": "5505", "fab_hash": APP}]
    coordinator, site = _written_logs(tmp_path, SITE + stray)

    result = CliRunner().invoke(
        _audit_app(),
        ["audit", str(coordinator.path), str(site.path), "--run", NAME, "--json"],
    )

    assert result.exit_code == 0, result.output
    assert "note: Flower run(s) 5505 ran this run's app" in result.stderr
    shown = [json.loads(line) for line in result.stdout.splitlines()]
    assert any(e.get("run_id") == "5505" for e in shown)  # and its lines are shown


def _written_logs(tmp_path, site_lines):
    """The coordinator's lines and ``site_lines`` written as two keyed audit logs."""
    coordinator = AuditLog(tmp_path / "coord" / "audit.jsonl", "coordinator")
    site = AuditLog(tmp_path / "site-01" / "audit.jsonl", "site:site-01")
    for log, lines in ((coordinator, COORDINATOR), (site, site_lines)):
        for line in lines:
            log.record(line["event"], **{k: v for k, v in line.items() if k != "event"})
    return coordinator, site


def _audit_app():
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("audit")(audit_command)
    return app
