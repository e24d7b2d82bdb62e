"""The hash-chained audit log: its chain, its key, concurrent writers.

The no-patient-data guard and the filters are in test_audit_fields.py, the
`wardround audit` command in test_audit_cli.py.
"""

from __future__ import annotations

import json
import multiprocessing
import stat
import tempfile
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from wardround.common.errors import DataError
from wardround.ops.audit import (
    GENESIS,
    RESERVED_KEYS,
    AuditCheck,
    AuditEvent,
    AuditLog,
    read_audit,
    verify_audit,
)
from wardround.ops.audit_cli import audit_command

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, like the real `wardround` app
    app.command("audit")(audit_command)
    return app


def _fill(path: Path, n: int, actor: str = "coordinator") -> AuditLog:
    log = AuditLog(path, actor)
    for i in range(n):
        log.record(AuditEvent.ROUND_FINISHED, run_id="run-1", server_round=i, loss=0.5)
    return log


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


# -- the chain -------------------------------------------------------------------
def test_many_records_form_an_intact_chain(tmp_path):
    path = tmp_path / "deep" / "er" / "audit.jsonl"
    _fill(path, 120)

    events = read_audit(path)
    assert [e["seq"] for e in events] == list(range(120))
    assert events[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hmac"] for a, b in zip(events, events[1:], strict=False))
    assert verify_audit(path) == AuditCheck(ok=True, lines=120)


def test_record_returns_the_line_it_wrote(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", "site:st-marys")
    entry = log.record(
        "site_joined",
        site="st-marys",
        address="127.0.0.1:9092",
        bytes_by_site={"st-marys": 1024, "general": 2048},
        sites=["st-marys", "general"],
        config=tmp_path / "site.toml",
        ok=True,
        note=None,
    )
    assert list(entry)[:4] == ["seq", "time", "actor", "event"]
    assert list(entry)[-2:] == ["prev", "hmac"]
    assert entry["event"] == "site_joined"
    assert entry["config"] == str(tmp_path / "site.toml")
    assert entry["time"].endswith("Z") and len(entry["time"]) == len(
        "2025-01-01T00:00:00.000Z"
    )
    assert read_audit(log.path) == [entry]


def test_file_is_private(tmp_path):
    path = tmp_path / "audit.jsonl"
    _fill(path, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _append_many(path: str, actor: str, n: int) -> None:
    log = AuditLog(Path(path), actor)
    for i in range(n):
        log.record(AuditEvent.PRIVACY_SPENT, run_id="r1", server_round=i, epsilon=0.1)


def test_two_processes_share_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_append_many, args=(str(path), actor, 50))
        for actor in ("coordinator", "launch")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)

    assert [w.exitcode for w in workers] == [0, 0]
    events = read_audit(path)
    assert len(events) == 100
    assert [e["seq"] for e in events] == list(range(100))
    assert {e["actor"] for e in events} == {"coordinator", "launch"}
    assert verify_audit(path).ok


def test_an_edited_field_breaks_the_chain_at_its_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    _fill(path, 10)
    lines = _lines(path)
    entry = json.loads(lines[4])
    entry["loss"] = 0.01  # the hmac no longer matches
    lines[4] = json.dumps(entry) + "\n"
    path.write_text("".join(lines))

    check = verify_audit(path)
    assert not check.ok
    assert check.first_bad_line == 5
    assert "hmac" in check.problem


def test_a_resealed_edit_is_caught_by_the_next_line(tmp_path):
    from wardround.ops.jsonl_log import hmac_seal as _mac

    path = tmp_path / "audit.jsonl"
    log = _fill(path, 10)
    lines = _lines(path)
    entry = json.loads(lines[4])
    entry["loss"] = 0.01
    body = {k: v for k, v in entry.items() if k != "hmac"}
    key = log.key_path.read_bytes()  # even with the key, the next line's prev breaks
    lines[4] = json.dumps({**body, "hmac": _mac(key, body)}) + "\n"
    path.write_text("".join(lines))

    check = verify_audit(path)
    assert (check.ok, check.first_bad_line) == (False, 6)
    assert "prev" in check.problem


@pytest.mark.parametrize("gone", [0, 3, 8])
def test_a_deleted_line_breaks_the_chain_where_it_was(tmp_path, gone):
    path = tmp_path / "audit.jsonl"
    _fill(path, 10)
    lines = _lines(path)
    del lines[gone]
    path.write_text("".join(lines))

    check = verify_audit(path)
    assert (check.ok, check.first_bad_line, check.lines) == (False, gone + 1, 9)


def test_swapped_lines_break_the_chain_at_the_first(tmp_path):
    path = tmp_path / "audit.jsonl"
    _fill(path, 10)
    lines = _lines(path)
    lines[6], lines[7] = lines[7], lines[6]
    path.write_text("".join(lines))

    check = verify_audit(path)
    assert (check.ok, check.first_bad_line) == (False, 7)


def test_a_garbage_line_is_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    _fill(path, 3)
    lines = _lines(path)
    lines.insert(1, "not json\n")
    path.write_text("".join(lines))

    assert verify_audit(path).first_bad_line == 2
    with pytest.raises(DataError, match="line 2"):
        read_audit(path)


def test_torn_tail_is_tolerated_then_repaired(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = _fill(path, 5)
    complete = path.read_bytes()
    path.write_bytes(complete + _lines(path)[-1][:37].encode())  # crash mid-write

    check = verify_audit(path)
    assert (check.ok, check.lines, check.torn_tail) == (True, 5, True)
    assert len(read_audit(path)) == 5

    entry = log.record(AuditEvent.RUN_FINISHED, run_id="run-1")
    assert entry["seq"] == 5
    assert path.read_bytes().startswith(complete)
    assert verify_audit(path) == AuditCheck(ok=True, lines=6)


def test_a_file_that_is_only_a_torn_line_restarts_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"seq":0,"ti')
    entry = AuditLog(path, "coordinator").record("coordinator_started")
    assert (entry["seq"], entry["prev"]) == (0, GENESIS)
    assert verify_audit(path) == AuditCheck(ok=True, lines=1)


def test_a_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = _fill(path, 3)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert verify_audit(path) == AuditCheck(ok=True, lines=3)

    assert log.record("run_stopped", run_id="run-1")["seq"] == 3
    assert verify_audit(path) == AuditCheck(ok=True, lines=4)


def test_record_refuses_to_extend_a_damaged_last_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = _fill(path, 3)
    lines = _lines(path)
    lines[-1] = lines[-1].replace('"loss":0.5', '"loss":0.6')
    path.write_text("".join(lines))
    with pytest.raises(DataError, match="last line does not verify"):
        log.record("error", reason="x")


def test_tail_reading_handles_lines_longer_than_a_chunk(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "coordinator")
    sites = [f"hospital-{i:04d}-" + "x" * 40 for i in range(200)]  # ~10 KB lines
    for _ in range(3):
        log.record("run_started", run_id="r", sites=sites)
    assert [e["seq"] for e in read_audit(path)] == [0, 1, 2]
    assert verify_audit(path).ok


# -- the key ---------------------------------------------------------------------
def _rechain_unkeyed(lines: list[str], start: int) -> list[str]:
    """What an attacker without the key can do: re-seal lines from ``start`` on with
    the old unkeyed sha256, each ``prev`` pointing at the line before."""
    from wardround.ops.jsonl_log import sha256_seal as _digest

    out = list(lines[:start])
    last = json.loads(out[-1]) if out else {}
    prev = last.get("hmac", last.get("sha256", GENESIS))
    for line in lines[start:]:
        entry = json.loads(line)
        body = {k: v for k, v in entry.items() if k not in ("hmac", "sha256")}
        body["prev"] = prev
        prev = _digest(body)
        out.append(json.dumps({**body, "sha256": prev}) + "\n")
    return out


def _legacy_log(path: Path, n: int) -> None:
    """A log as wardround wrote it before the chain was keyed (plain sha256)."""
    log = _fill(path.parent / "written-keyed" / path.name, n)
    path.write_text("".join(_rechain_unkeyed(_lines(log.path), 0)))


def test_the_key_is_private_beside_the_log_and_not_in_it(tmp_path):
    path = tmp_path / "state" / "audit.jsonl"
    log = _fill(path, 3)
    assert log.key_path == tmp_path / "state" / "audit.key"
    assert stat.S_IMODE(log.key_path.stat().st_mode) == 0o600
    key = log.key_path.read_bytes()
    assert len(key) == 64 and key not in path.read_bytes()
    _fill(path, 2)  # a second writer uses the same key
    assert log.key_path.read_bytes() == key
    assert verify_audit(path) == AuditCheck(ok=True, lines=5)


@pytest.mark.parametrize("start", [0, 4, 9])
def test_a_log_rewritten_and_rechained_without_the_key_fails_at_that_line(
    tmp_path, start
):
    path = tmp_path / "audit.jsonl"
    _fill(path, 10)
    lines = _lines(path)
    edited = json.loads(lines[start])
    edited["loss"] = 0.01
    lines[start] = json.dumps(edited) + "\n"
    path.write_text("".join(_rechain_unkeyed(lines, start)))

    check = verify_audit(path)
    assert not check.ok
    if start == 0:  # the whole log rewritten: nothing is keyed any more
        assert check.first_bad_line is None and check.unkeyed_lines == 10
        assert "no line is keyed" in check.problem
    else:
        assert check.first_bad_line == start + 1
        assert "not keyed, though lines before it are" in check.problem
    result = runner.invoke(_app(), ["audit", "--verify", str(path)])
    assert result.exit_code == DataError.exit_code
    assert "ok " not in result.output
    if start:
        assert f"{path}: line {start + 1}:" in result.output


def test_a_log_resealed_with_a_guessed_key_fails_at_its_first_line(tmp_path):
    from wardround.ops.jsonl_log import hmac_seal as _mac

    path = tmp_path / "audit.jsonl"
    _fill(path, 4)
    forged, prev = [], GENESIS
    for line in _lines(path):
        body = {k: v for k, v in json.loads(line).items() if k != "hmac"}
        body["prev"] = prev
        prev = _mac(b"0" * 64, body)
        forged.append(json.dumps({**body, "hmac": prev}) + "\n")
    path.write_text("".join(forged))

    check = verify_audit(path)
    assert (check.ok, check.first_bad_line) == (False, 1)
    assert "re-sealed without the key" in check.problem


def test_verify_needs_the_key_and_takes_it_from_elsewhere(tmp_path):
    from wardround.common.errors import ConfigError

    path = tmp_path / "logs" / "audit.jsonl"
    log = _fill(path, 3)
    kept = tmp_path / "vault" / "site-a.key"
    kept.parent.mkdir()
    log.key_path.rename(kept)

    with pytest.raises(ConfigError) as refused:
        verify_audit(path)
    assert "--key FILE" in refused.value.hint
    assert verify_audit(path, kept) == AuditCheck(ok=True, lines=3)

    result = runner.invoke(_app(), ["audit", "--verify", str(path)])
    assert result.exit_code == 2 and "its key is not at" in result.output
    result = runner.invoke(_app(), ["audit", "--verify", str(path), "--key", str(kept)])
    assert result.exit_code == 0, result.output
    assert "keyed chain intact" in result.output
    shown = runner.invoke(_app(), ["audit", str(path), "--json"])
    assert shown.exit_code == 0 and "not verified" in shown.output

    kept.chmod(0o644)
    with pytest.raises(ConfigError, match="readable or writable by other users"):
        verify_audit(path, kept)


def test_an_old_unkeyed_log_is_read_and_reported_unkeyed(tmp_path):
    path = tmp_path / "audit.jsonl"
    _legacy_log(path, 5)
    assert len(read_audit(path)) == 5

    check = verify_audit(path)
    assert (check.ok, check.unkeyed_lines, check.first_bad_line) == (False, 5, None)
    result = runner.invoke(_app(), ["audit", "--verify", str(path)])
    assert result.exit_code == DataError.exit_code
    assert f"UNKEYED {path}: 5 line(s): no line is keyed" in result.output


def test_appending_to_an_old_log_seals_its_unkeyed_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    _legacy_log(path, 5)
    AuditLog(path, "site:a").record("site_daemon_started", pid=1)

    check = verify_audit(path)
    assert check == AuditCheck(ok=True, lines=6, unkeyed_lines=5)
    result = runner.invoke(_app(), ["audit", "--verify", str(path)])
    assert result.exit_code == 0
    assert "lines 1-5 predate keying (sha256), sealed by keyed line 6" in result.output

    # the old lines are now covered: re-chaining them breaks at the keyed line
    lines = _lines(path)
    edited = json.loads(lines[2])
    edited["loss"] = 0.01
    lines[2] = json.dumps(edited) + "\n"
    rechained = _rechain_unkeyed(lines[:5], 2) + lines[5:]
    path.write_text("".join(rechained))
    assert verify_audit(path).first_bad_line == 6


def test_record_refuses_to_seal_a_keyed_log_rewritten_unkeyed(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = _fill(path, 4)
    path.write_text("".join(_rechain_unkeyed(_lines(path), 0)))
    with pytest.raises(DataError, match="last line is not keyed"):
        log.record("error", reason="x")
    assert len(read_audit(path)) == 4


_TEXT = st.text(alphabet="abcXYZ019 ._:/@=+,-()[]'", max_size=300)
_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    _TEXT,
)
_VALUE = st.one_of(
    _SCALAR,
    st.lists(_SCALAR, max_size=5),
    st.dictionaries(_TEXT.filter(bool), _SCALAR, max_size=5),
)
_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True).filter(
    lambda name: name not in RESERVED_KEYS
)
_RECORD = st.tuples(
    st.sampled_from(list(AuditEvent)), st.dictionaries(_NAME, _VALUE, max_size=4)
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(_RECORD, min_size=1, max_size=8))
def test_any_sequence_of_allowed_records_verifies(records):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "audit.jsonl"
        log = AuditLog(path, "site:prop")
        written = [log.record(event, **fields) for event, fields in records]
        assert verify_audit(path) == AuditCheck(ok=True, lines=len(records))
        assert read_audit(path) == written
