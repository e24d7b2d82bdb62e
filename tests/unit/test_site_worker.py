"""The site's warm worker: what its audit observer records, the numeric metrics it
reads from a reply, and how a task its SuperNode dropped ends (not the daemon)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from wardround.client.daemon import AuditingObserver
from wardround.client.site_worker import APP_NOT_APPROVED, TaskOutcome, _numeric_metrics
from wardround.common import wire
from wardround.ops.audit import AuditLog, read_audit, verify_audit

# ------------------------------------------------------------------ the observer


def _outcome(**changes) -> TaskOutcome:
    values = {
        "run_id": 5,
        "fab_hash": "ab" * 32,
        "message_type": "train",
        "group": "1",
        "approved": True,
        "ok": True,
        "bytes_in": 1000,
        "bytes_out": 2000,
        "seconds": 1.23456,
        "app_seconds": 0.98765,
    }
    values.update(changes)
    return TaskOutcome(**values)


@pytest.fixture
def audit_path(tmp_path) -> Path:
    return tmp_path / "state" / "audit.jsonl"


def _observer(audit_path: Path) -> AuditingObserver:
    return AuditingObserver(AuditLog(audit_path, actor="site:site-01"))


def test_the_operator_gets_one_line_per_training_answer(audit_path):
    said = []
    observer = AuditingObserver(
        AuditLog(audit_path, actor="site:site-01"), say=said.append
    )
    spent = {
        wire.DP_EPSILON_RUN: 2.3149,
        wire.DP_EPSILON_TOTAL: 4.5,
        wire.WIRE_VERSION_KEY: wire.WIRE_VERSION,
    }

    observer.on_task(
        _outcome(run_name="20261207-run\x1b[2J", server_round=2, metrics=spent)
    )
    # SecAgg+'s other stages travel as train messages without the handler's metrics
    observer.on_task(_outcome(server_round=2, metrics={}))
    observer.on_task(_outcome(message_type="evaluate", metrics=spent))
    observer.on_task(_outcome(ok=False, error="[PrivacyBudgetExhausted] ..."))
    observer.on_task(_outcome(approved=False, ok=False, error="[AppNotApproved]"))

    assert said == [
        'run "20261207-run[2J" round 2: trained and answered in 1.2 s, 2,000 bytes '
        "sent; ε 2.31 spent on this run, 4.50 over all runs"
    ]


def test_observer_records_a_refused_app(audit_path):
    observer = _observer(audit_path)
    observer.on_task(_outcome(approved=False, ok=False, error="[AppNotApproved] ..."))
    events = read_audit(audit_path)
    assert [e["event"] for e in events] == ["app_refused"]
    assert events[0]["run_id"] == "5"
    assert events[0]["fab_hash"] == "ab" * 32
    assert events[0]["reason"] == APP_NOT_APPROVED
    assert events[0]["actor"] == "site:site-01"
    assert observer.runs_seen == set()


def test_observer_records_a_run_once_and_every_round(audit_path):
    observer = _observer(audit_path)
    observer.on_task(_outcome(group="1"))
    observer.on_task(_outcome(group="1", message_type="evaluate"))
    observer.on_task(_outcome(group="2"))
    observer.on_task(_outcome(run_id=6, group="1"))
    events = read_audit(audit_path)
    assert [(e["event"], e["run_id"]) for e in events] == [
        ("run_started", "5"),
        ("round_finished", "5"),
        ("round_finished", "5"),
        ("round_finished", "5"),
        ("run_started", "6"),
        ("round_finished", "6"),
    ]
    first = events[1]
    assert first["round"] == 1
    assert first["message_type"] == "train"
    assert first["bytes_in"] == 1000 and first["bytes_out"] == 2000
    assert first["seconds"] == 1.235 and first["app_seconds"] == 0.988
    assert first["ok"] is True
    assert events[0]["fab_hash"] == "ab" * 32
    rounds = [e["round"] for e in events if e["event"] == "round_finished"]
    assert rounds == [1, 1, 2, 1]
    assert verify_audit(audit_path).ok


def test_observer_round_is_none_for_a_non_numeric_group(audit_path):
    _observer(audit_path).on_task(_outcome(group="secagg-stage"))
    assert read_audit(audit_path)[-1]["round"] is None


def test_observer_records_privacy_spent(audit_path):
    observer = _observer(audit_path)
    observer.on_task(
        _outcome(
            group="3", metrics={wire.DP_EPSILON_RUN: 1.5, wire.DP_EPSILON_TOTAL: 4.0}
        )
    )
    observer.on_task(_outcome(group="4", metrics={wire.DP_EPSILON_RUN: 2.0}))
    observer.on_task(_outcome(group="5", metrics={"train-loss": 0.3}))
    spent = [e for e in read_audit(audit_path) if e["event"] == "privacy_spent"]
    assert [(e["round"], e["epsilon_run"], e["epsilon_total"]) for e in spent] == [
        (3, 1.5, 4.0),
        (4, 2.0, None),
    ]


def test_observer_records_a_failed_task_as_an_error(audit_path):
    observer = _observer(audit_path)
    observer.on_task(
        _outcome(group="2", ok=False, error="ValueError: bad <value>\nline two")
    )
    events = read_audit(audit_path)
    assert [e["event"] for e in events] == ["run_started", "round_finished", "error"]
    assert events[1]["ok"] is False
    error = events[2]
    assert error["run_id"] == "5" and error["round"] == 2
    assert error["reason"] == "ValueError: bad value line two"


def test_repeated_refused_and_failed_tasks_are_thinned_whatever_they_name(
    audit_path, tmp_path
):
    egress = tmp_path / "egress.jsonl"
    observer = AuditingObserver(AuditLog(audit_path, actor="site:x"), egress)
    for i in range(100):
        # a fresh run, app and round each time: none of them may buy a line
        observer.on_task(
            _outcome(run_id=1000 + i, fab_hash=f"{i:064x}", approved=False)
        )
        observer.on_task(
            _outcome(
                run_id=5,
                server_round=1000 + i,
                run_name="x" * 100_000,
                ok=False,
                error=f"[FederationError] round {1000 + i} is not approved",
            )
        )

    events = read_audit(audit_path)
    refused = [e for e in events if e["event"] == "app_refused"]
    failed = [e for e in events if e["event"] == "round_finished"]
    # ten in full, then the 20th, 30th, ... 100th: 19 lines for 100
    assert len(refused) == 19 and refused[-1]["repeated"] == 100
    assert len(failed) == 19 and failed[-1]["repeated"] == 100
    assert len([e for e in events if e["event"] == "error"]) == 19
    lines = egress.read_text().splitlines()
    assert len(lines) == 19
    assert max(len(line) for line in lines) < 1000  # the run name is cut


def test_observer_never_raises_on_an_unloggable_field(audit_path):
    observer = _observer(audit_path)
    # refused by the audit log (not its alphabet): logged, not raised
    observer.on_task(_outcome(message_type="train\n{patient}"))
    observer.on_task(_outcome(group="2"))
    events = read_audit(audit_path)
    assert [e["event"] for e in events] == ["run_started", "round_finished"]
    assert events[-1]["round"] == 2


# ------------------------------------------------------------------ metrics


def _content() -> RecordDict:
    return RecordDict(
        {
            "metrics": MetricRecord(
                {"train-loss": 0.5, "num-examples": 32, "hist": [1.0, 2.0]}
            ),
            "fitres.metrics": ConfigRecord(
                {
                    wire.DP_EPSILON_RUN: 1.25,
                    "rounds": 3,
                    "site": "site-01",
                    "clipped": True,
                    "blob": b"\x00",
                }
            ),
            "arrays": ArrayRecord(),
        }
    )


def test_numeric_metrics_reads_metric_and_config_records():
    metrics = _numeric_metrics(SimpleNamespace(content=_content()))
    assert metrics == {
        "train-loss": 0.5,
        "num-examples": 32.0,
        wire.DP_EPSILON_RUN: 1.25,
        "rounds": 3.0,
    }
    assert all(type(v) is float for v in metrics.values())


def test_numeric_metrics_of_a_flower_message(task_identity):
    message = Message(content=_content(), dst_node_id=1, message_type="train")
    assert _numeric_metrics(message)[wire.DP_EPSILON_RUN] == 1.25
    assert "clipped" not in _numeric_metrics(message)


def test_numeric_metrics_of_empty_content():
    assert _numeric_metrics(SimpleNamespace(content=RecordDict())) == {}


# ------------------------------------------------------------------ task heartbeat


def test_a_task_its_supernode_dropped_is_cancelled_not_the_daemon():
    import threading

    from wardround.client.site_worker import task_heartbeat_fn
    from wardround.flower_compat.runtime import SendTaskHeartbeatResponse

    class Client:
        success = True

        def SendTaskHeartbeat(self, request):  # noqa: N802 - Flower's name
            return SendTaskHeartbeatResponse(success=self.success)

    client, cancelled = Client(), threading.Event()
    beat = task_heartbeat_fn(client, cancelled)
    assert beat() and not cancelled.is_set()
    client.success = False  # Flower's own function would raise SIGINT here
    assert beat() and cancelled.is_set()


def test_a_cancelled_task_stops_retrying_its_calls():
    import threading

    from wardround.client.approvals import AppApprovals
    from wardround.client.site_worker import SiteWorker

    worker = SiteWorker("127.0.0.1:9", AppApprovals(Path("/nonexistent")))
    cancelled = threading.Event()
    client = worker._runtime_client("flwr-clientapp", token="t", cancelled=cancelled)
    retry = client._retry_invoker if hasattr(client, "_retry_invoker") else None
    invoker = retry or next(
        v for v in vars(client).values() if hasattr(v, "should_giveup")
    )
    assert not invoker.should_giveup(ConnectionRefusedError())
    # a SuperNode that restarted no longer knows the task's token: Flower's own
    # invoker would SIGINT this process (the whole site daemon) here
    import httpx

    unauthorized = httpx.HTTPStatusError(
        "401",
        request=httpx.Request("POST", "http://127.0.0.1:9/x"),
        response=httpx.Response(401),
    )
    assert invoker.should_giveup(unauthorized)
    cancelled.set()
    assert invoker.should_giveup(ConnectionRefusedError())
    assert invoker.max_time is not None


def test_a_call_retrying_a_supernode_that_moved_gives_up_so_the_worker_follows():
    # Flower retries a refused connection for ever; once the daemon has moved the
    # SuperNode to another port, the worker's pending AcquireTask must give up
    from wardround.client.approvals import AppApprovals
    from wardround.client.site_worker import SiteWorker

    worker = SiteWorker("127.0.0.1:9", AppApprovals(Path("/nonexistent")))
    acquirer = worker._runtime_client("SuperExec")
    invoker = next(v for v in vars(acquirer).values() if hasattr(v, "should_giveup"))
    assert not invoker.should_giveup(ConnectionRefusedError())
    worker.runtime_api_address = "127.0.0.1:10"
    assert invoker.should_giveup(ConnectionRefusedError())
    acquirer.close()


def test_the_worker_follows_a_supernode_that_moved_and_ends_on_stop(monkeypatch):
    import threading
    import time

    from wardround.client.approvals import AppApprovals
    from wardround.client.daemon import free_loopback_port
    from wardround.client.site_worker import SiteWorker

    first, second = free_loopback_port(), free_loopback_port()  # nothing listens
    worker = SiteWorker(f"127.0.0.1:{first}", AppApprovals(Path("/nonexistent")))
    monkeypatch.setattr(worker, "warm_up", lambda: None)
    made: list[str] = []
    make = worker._runtime_client

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        made.append(worker.runtime_api_address)
        return make(*args, **kwargs)

    monkeypatch.setattr(worker, "_runtime_client", recording)
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # its AcquireTask is retrying the refused first port
        worker.runtime_api_address = f"127.0.0.1:{second}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and made[-1:] != [f"127.0.0.1:{second}"]:
            time.sleep(0.1)
        assert made == [f"127.0.0.1:{first}", f"127.0.0.1:{second}"]
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()  # the call retrying a gone SuperNode gave up


def test_a_group_id_of_the_coordinators_choosing_costs_no_record_of_what_was_sent(
    audit_path, tmp_path
):
    """'²' passes str.isdigit() and fails int(): the answer is still on record."""
    egress = tmp_path / "egress.jsonl"
    said: list[str] = []
    observer = AuditingObserver(
        AuditLog(audit_path, actor="site:x"), egress, say=said.append
    )
    spent = {wire.DP_EPSILON_RUN: 0.8, wire.WIRE_VERSION_KEY: wire.WIRE_VERSION}
    for group in ("²", "9" * 5000):
        observer.on_task(_outcome(group=group, server_round=None, metrics=spent))

    events = [e["event"] for e in read_audit(audit_path)]
    assert events == ["run_started"] + ["round_finished", "privacy_spent"] * 2
    assert [e["round"] for e in read_audit(audit_path)[1:]] == [None] * 4
    from wardround.client.egress_log import read_egress

    assert [row["bytes_out"] for row in read_egress(egress)] == [2000, 2000]
    assert len(said) == 2


def test_a_field_the_audit_log_refuses_costs_that_line_only(audit_path, tmp_path):
    egress = tmp_path / "egress.jsonl"
    said: list[str] = []
    observer = AuditingObserver(
        AuditLog(audit_path, actor="site:x"), egress, say=said.append
    )
    spent = {wire.DP_EPSILON_RUN: 0.8, wire.WIRE_VERSION_KEY: wire.WIRE_VERSION}
    observer.on_task(
        _outcome(message_type="train<x>", server_round=3, metrics=spent)
    )  # no terminal line: not a "train" message, but the egress log has it
    observer.on_task(_outcome(server_round=4, metrics=spent))

    events = [(e["event"], e.get("round")) for e in read_audit(audit_path)]
    assert ("privacy_spent", 3) in events and ("round_finished", 4) in events
    from wardround.client.egress_log import read_egress

    assert [row["round"] for row in read_egress(egress)] == [3, 4]
    assert len(said) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3), (3.0, 3), (True, None), (2.5, None), (float("nan"), None),
     (float("inf"), None), ("3", None), (None, None), (1e300, None),
     (2**31 - 1, 2**31 - 1), (2**31, None)],
)  # fmt: skip
def test_every_part_of_the_site_reads_a_round_number_alike(value, expected):
    assert wire.round_number(value) == expected


def test_secagg_stages_are_recorded_under_the_run_name_the_run_gave(
    audit_path, tmp_path
):
    # SecAgg+'s key and share stages carry no run name; the train message does
    from wardround.client.daemon import RUN_NAMES_KEPT
    from wardround.client.egress_log import read_egress

    egress = tmp_path / "egress.jsonl"
    observer = AuditingObserver(AuditLog(audit_path, actor="site:x"), egress)
    observer.on_task(_outcome(run_id=7, message_type="train"))  # before any name
    observer.on_task(_outcome(run_id=7, run_name="20261208-run", server_round=1))
    observer.on_task(_outcome(run_id=7, group="1"))  # a SecAgg+ stage
    observer.on_task(_outcome(run_id=8, group="1"))  # another run, never named
    for run_id in range(100, 100 + RUN_NAMES_KEPT):
        observer.on_task(_outcome(run_id=run_id, run_name=f"run-{run_id}"))
    observer.on_task(_outcome(run_id=7, group="2"))  # its name was let go

    observer.on_task(_outcome(run_id=9, run_name="20261208-run"))  # another run
    observer.on_task(_outcome(run_id=9, run_name="renamed"))  # the first name stays
    observer.on_task(_outcome(run_id=9, group="3"))

    rows = [(row["run_id"], row["flower_run_id"]) for row in read_egress(egress)]
    assert rows[:4] == [("7", 7), ("20261208-run", 7), ("20261208-run", 7), ("8", 8)]
    assert rows[4 + RUN_NAMES_KEPT] == ("7", 7)
    assert len(observer.run_names) == RUN_NAMES_KEPT
    # the same name on two Flower runs: the site's own id tells them apart
    assert rows[-3:] == [("20261208-run", 9), ("renamed", 9), ("20261208-run", 9)]
