"""The one sealed JSONL primitive, and the on-disk formats it must keep.

The golden files below were written by the audit log and the privacy ledger
before they shared :mod:`wardround.ops.jsonl_log`; they must still verify, read
and take appends.
"""

import json
import os
import stat

import pytest

from wardround.client.ledger import PrivacyLedger, _encode
from wardround.common.privacy import Mechanism
from wardround.ops.audit import AuditLog, read_audit, verify_audit
from wardround.ops.jsonl_log import (
    hmac_seal,
    locked_for_append,
    parse_object,
    read_locked,
    sha256_seal,
)

AUDIT_KEY = b"ab" * 32
GOLDEN_AUDIT = (
    '{"seq":0,"time":"2026-12-05T05:16:15.254Z","actor":"site:st-marys","event":"site_daemon_started","address":"127.0.0.1:9092","prev":"0000000000000000000000000000000000000000000000000000000000000000","hmac":"5a8f6da8e4f8575259d6b9028e83ce0db13c022465710649ce8c1934eb4d0a82"}\n',
    '{"seq":1,"time":"2026-12-05T05:16:15.260Z","actor":"site:st-marys","event":"privacy_spent","run_id":"run-1","epsilon":0.5,"sites":["site-01","site-02"],"prev":"5a8f6da8e4f8575259d6b9028e83ce0db13c022465710649ce8c1934eb4d0a82","hmac":"a17fe1f51d9edf431257edccce4fe8b8e4fe45c9b4153b75198a38c53fd7b912"}\n',
)
GOLDEN_LEDGER = (
    '{"accountant": "rdp", "base_model": "abc", "delta": 1e-05, "id": "1466ffbddd8743f8aeaf36e5843f1a30", "kind": "reserve", "max_grad_norm": 1.0, "noise_multiplier": 1.1, "round": 1, "run": "run-1", "sample_rate": 0.01, "sha256": "e5e0015444fec1ada7f8aeb14d4d4c750fc512c599164d766f7aff86003334f8", "steps": 50, "time": 1796447775.264552, "v": 1}\n',
    '{"epsilon_run": 0.3, "epsilon_total": 0.3, "id": "1466ffbddd8743f8aeaf36e5843f1a30", "kind": "commit", "sha256": "7d51f2bd66907fa2bac08a37523def2f9fd8d457fd54ecbd47e942525dc1e23a", "steps": 48, "time": 1796447775.2722275, "v": 1}\n',
)


@pytest.fixture
def golden(tmp_path):
    (tmp_path / "audit.jsonl").write_text("".join(GOLDEN_AUDIT))
    key = tmp_path / "audit.key"
    key.write_bytes(AUDIT_KEY)
    key.chmod(0o600)
    (tmp_path / "ledger.jsonl").write_text("".join(GOLDEN_LEDGER))
    return tmp_path


def test_an_audit_log_written_before_the_shared_log_verifies_and_takes_appends(golden):
    path = golden / "audit.jsonl"
    assert verify_audit(path).ok
    AuditLog(path, actor="site:st-marys").record("site_daemon_stopped")
    check = verify_audit(path)
    assert (check.ok, check.lines) == (True, 3)
    assert [e["event"] for e in read_audit(path)][-1] == "site_daemon_stopped"


def test_an_edited_golden_audit_line_fails_verification(golden):
    path = golden / "audit.jsonl"
    path.write_text("".join(GOLDEN_AUDIT).replace('"epsilon":0.5', '"epsilon":0.4'))
    check = verify_audit(path)
    assert (check.ok, check.first_bad_line) == (False, 2)


def test_a_ledger_written_before_the_shared_log_reads_and_takes_appends(golden):
    ledger = PrivacyLedger(golden / "ledger.jsonl")
    assert [m.steps for m in ledger.history()] == [48]
    entry = ledger.reserve(
        "run-2",
        1,
        Mechanism(1.0, 0.02, 10),
        delta=1e-5,
        max_grad_norm=1.0,
        accountant="rdp",
        base_model="abc",
    )
    assert [m.steps for m in PrivacyLedger(ledger.path).history()] == [48, 10]
    assert entry in (golden / "ledger.jsonl").read_text()


def test_lines_are_encoded_and_sealed_byte_for_byte_as_before():
    for line in GOLDEN_LEDGER:
        entry = json.loads(line)
        body = {k: v for k, v in entry.items() if k != "sha256"}
        assert _encode(body).decode() == line
        assert sha256_seal(body) == entry["sha256"]
    for line in GOLDEN_AUDIT:
        entry = json.loads(line)
        body = {k: v for k, v in entry.items() if k != "hmac"}
        assert hmac_seal(AUDIT_KEY, body) == entry["hmac"]


def test_a_new_file_is_private_and_a_missing_one_is_not_made_without_create(tmp_path):
    path = tmp_path / "log.jsonl"
    with pytest.raises(FileNotFoundError):
        with locked_for_append(path, create=False):
            pass
    assert not path.exists()
    old = os.umask(0)
    try:
        with locked_for_append(path, create=True) as log_file:
            log_file.append(b"{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_locked(path) == b"{}\n"


def test_an_append_cuts_a_torn_tail_or_completes_a_partial_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":')
    with locked_for_append(path, create=False) as log_file:
        log_file.append(b'{"c":3}\n', cut_at=len(b'{"a":1}\n'))
    assert path.read_bytes() == b'{"a":1}\n{"c":3}\n'
    path.write_bytes(b'{"a":1}')
    with locked_for_append(path, create=False) as log_file:
        log_file.append(b'{"c":3}\n', after_partial=True)
    assert path.read_bytes() == b'{"a":1}\n{"c":3}\n'


def test_read_tail_holds_the_last_complete_line_of_a_long_file(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"n": n, "pad": "x" * 300}) + "\n" for n in range(100)]
    path.write_text("".join(lines))
    with locked_for_append(path, create=False) as log_file:
        buf, whole, size = log_file.read_tail()
    assert not whole and size == path.stat().st_size
    assert buf.rpartition(b"\n")[0].rpartition(b"\n")[2] == lines[-1][:-1].encode()


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"{", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b"NaN", "not valid JSON"),
    ],
)
def test_a_line_that_is_not_a_json_object_is_named(line, problem):
    assert parse_object(line) == (None, problem)
