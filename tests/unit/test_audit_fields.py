"""What an audit line may hold (no patient data), and the pure filters over events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from wardround.ops.audit import (
    RESERVED_KEYS,
    AuditEvent,
    AuditLog,
    filter_events,
    merge_by_time,
    safe_reason,
)

# -- no patient data -------------------------------------------------------------
PATIENT = "Jane Doe, MRN 4471-22"


@pytest.mark.parametrize(
    "value",
    [
        f"{PATIENT}\nchest pain",
        f"{PATIENT} 100%",
        f"{PATIENT} #2",
        f"{PATIENT} " + "note " * 80,
        {"outer": {"inner": PATIENT}},
        [PATIENT, [PATIENT]],
        {"site": float("nan")},
        PATIENT.encode(),
        f"{PATIENT} é",
        f"{PATIENT}\t",
    ],
)
def test_patient_looking_values_are_refused_without_echo(tmp_path, value):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "site:a")
    with pytest.raises(ValueError) as info:
        log.record("error", free_text=value)
    assert "free_text" in str(info.value)
    assert "Jane" not in str(info.value) and "4471" not in str(info.value)
    assert not path.exists() or path.read_bytes() == b""


def test_dict_keys_are_checked_without_echo(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", "coordinator")
    with pytest.raises(ValueError, match="epsilon_by_site") as info:
        log.record("privacy_spent", epsilon_by_site={"Jane Doe\n": 1.0})
    assert "Jane" not in str(info.value)


@pytest.mark.parametrize("name", sorted(RESERVED_KEYS - {"event"}))
def test_reserved_field_names_are_refused(tmp_path, name):
    log = AuditLog(tmp_path / "audit.jsonl", "coordinator")
    with pytest.raises(ValueError, match=name):
        log.record("error", **{name: "x"})


@pytest.mark.parametrize("name", ["CamelCase", "with-dash", "_private", "1st", "a b"])
def test_field_names_must_be_snake_case(tmp_path, name):
    log = AuditLog(tmp_path / "audit.jsonl", "coordinator")
    with pytest.raises(ValueError, match="snake_case"):
        log.record("error", **{name: "x"})


def test_unknown_events_and_actors_are_refused(tmp_path):
    with pytest.raises(ValueError):
        AuditLog(tmp_path / "audit.jsonl", "coordinator").record("patient_admitted")
    with pytest.raises(ValueError):
        AuditLog(tmp_path / "audit.jsonl", "bad\nactor")


def test_event_enum_is_exactly_the_agreed_set():
    assert {e.value for e in AuditEvent} == {
        "coordinator_started", "coordinator_stopped", "site_daemon_started",
        "site_daemon_stopped", "supernode_restarted", "runtime_port_moved",
        "site_enrolled", "site_revoked",
        "site_joined",
        "site_left", "site_refused", "run_started", "run_resumed", "run_paused",
        "run_finished", "run_stopped", "round_started", "round_finished",
        "round_repeated",
        "app_approved", "app_refused", "privacy_spent", "answer_sent",
        "answer_refused", "answer_replayed", "node_ignored", "error",
    }  # fmt: skip


def test_safe_reason_squeezes_any_text_into_the_alphabet(tmp_path):
    reason = safe_reason("boom:\n  value #3 is 100% wrong\t(é) " + "z" * 500)
    assert reason.startswith("boom: value 3 is 100 wrong ( ) zzz")
    assert len(reason) <= 300
    AuditLog(tmp_path / "audit.jsonl", "coordinator").record("error", reason=reason)


# -- filters ---------------------------------------------------------------------
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _at(minutes: int, event: str, **fields) -> dict:
    stamp = (T0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds")
    return {"time": stamp.replace("+00:00", "Z"), "event": event, **fields}


EVENTS = [
    _at(0, "run_started", run_id="r1", sites=["a", "b"]),
    _at(1, "site_joined", site="a"),
    _at(2, "round_finished", run_id="r1", server_round=1),
    _at(3, "privacy_spent", run_id="r1", site="b", epsilon=0.4),
    _at(4, "run_started", run_id="r2", sites=["c"]),
    _at(5, "run_finished", run_id="r1"),
]


def test_filter_by_run_site_event_and_time():
    def kinds(events):
        return [e["event"] for e in events]

    assert kinds(filter_events(EVENTS, run="r1")) == [
        "run_started", "round_finished", "privacy_spent", "run_finished",
    ]  # fmt: skip
    assert kinds(filter_events(EVENTS, site="a")) == ["run_started", "site_joined"]
    assert kinds(filter_events(EVENTS, site="b")) == ["run_started", "privacy_spent"]
    assert kinds(filter_events(EVENTS, event="run_started")) == ["run_started"] * 2
    assert kinds(
        filter_events(EVENTS, event=[AuditEvent.SITE_JOINED, "run_finished"])
    ) == ["site_joined", "run_finished"]
    assert kinds(
        filter_events(
            EVENTS,
            since=T0 + timedelta(minutes=2),
            until=T0.replace(tzinfo=None) + timedelta(minutes=4),
        )
    ) == ["round_finished", "privacy_spent", "run_started"]
    assert filter_events(EVENTS, run="r2", site="a") == []
    with pytest.raises(ValueError):
        filter_events(EVENTS, event="nope")


def test_merge_interleaves_by_time():
    merged = merge_by_time([*EVENTS[::2], *EVENTS[1::2]])
    assert merged == EVENTS


# -- property --------------------------------------------------------------------
