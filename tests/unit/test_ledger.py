import json
import logging
import multiprocessing
import stat

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from wardround.client.ledger import PrivacyLedger, ledger_file
from wardround.common.config import Accountant
from wardround.common.errors import DataError
from wardround.common.privacy import Mechanism

DELTA = 1e-5
ROUND = Mechanism(noise_multiplier=2.0, sample_rate=0.02, steps=5)
FINGERPRINT = "ab" * 32


@pytest.fixture
def ledger(tmp_path):
    return PrivacyLedger(ledger_file(tmp_path / "privacy-ledger"))


def _train_round(ledger, run_id, server_round, mechanism=ROUND, steps_taken=None):
    entry_id = ledger.reserve(
        run_id,
        server_round,
        mechanism,
        delta=DELTA,
        max_grad_norm=1.0,
        accountant=Accountant.RDP,
        base_model=FINGERPRINT,
    )
    taken = mechanism.steps if steps_taken is None else steps_taken
    ledger.commit(entry_id, taken, epsilon_run=0.0, epsilon_total=0.0)
    return entry_id


def _opacus_epsilon(accountant, history):
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(DELTA)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ledger_epsilon_equals_opacus_recomputed_from_the_file(ledger):
    _train_round(ledger, "run-a", 1)
    _train_round(ledger, "run-a", 2, Mechanism(1.5, 0.04, 4), steps_taken=3)

    lines = _lines(ledger.path)
    taken = {e["id"]: e["steps"] for e in lines if e["kind"] == "commit"}
    history = [
        (e["noise_multiplier"], e["sample_rate"], taken[e["id"]])
        for e in lines
        if e["kind"] == "reserve"
    ]

    assert history == [(2.0, 0.02, 5), (1.5, 0.04, 3)]
    assert ledger.epsilon(DELTA, Accountant.RDP) == pytest.approx(
        _opacus_epsilon(RDPAccountant(), history), rel=1e-12
    )


@pytest.mark.parametrize(
    ("accountant", "opacus"),
    [(Accountant.RDP, RDPAccountant), (Accountant.PRV, PRVAccountant)],
)
def test_r_rounds_equal_one_accountant_over_all_steps(ledger, accountant, opacus):
    rounds = 4
    for server_round in range(1, rounds + 1):
        _train_round(ledger, "run-a", server_round)

    expected = opacus()
    expected.history = [
        (ROUND.noise_multiplier, ROUND.sample_rate, rounds * ROUND.steps)
    ]

    assert ledger.epsilon(DELTA, accountant, "run-a") == pytest.approx(
        expected.get_epsilon(DELTA), rel=1e-9
    )


def test_reservation_without_commit_counts_its_planned_steps(ledger):
    _train_round(ledger, "run-a", 1, steps_taken=2)
    ledger.reserve(
        "run-a",
        2,
        ROUND,
        delta=DELTA,
        max_grad_norm=1.0,
        accountant="rdp",
        base_model=FINGERPRINT,
    )  # the site crashed while training round 2

    assert ledger.history() == [Mechanism(2.0, 0.02, 2), Mechanism(2.0, 0.02, 5)]


def test_ledger_spans_runs(ledger):
    _train_round(ledger, "run-a", 1)
    _train_round(ledger, "run-b", 1)
    _train_round(ledger, "run-b", 2)

    run_b = ledger.epsilon(DELTA, Accountant.RDP, "run-b")
    total = ledger.epsilon(DELTA, Accountant.RDP)

    assert ledger.history("run-b") == [ROUND, ROUND]
    assert total > run_b > ledger.epsilon(DELTA, Accountant.RDP, "run-a") > 0
    assert total == pytest.approx(ledger.epsilon(DELTA, Accountant.RDP, None), rel=0)


def test_projected_is_what_the_ledger_reports_after_the_round(ledger):
    _train_round(ledger, "run-a", 1)
    _train_round(ledger, "run-b", 1)

    run_after, total_after = ledger.projected(ROUND, DELTA, Accountant.RDP, "run-b")
    _train_round(ledger, "run-b", 2)

    assert run_after == pytest.approx(ledger.epsilon(DELTA, Accountant.RDP, "run-b"))
    assert total_after == pytest.approx(ledger.epsilon(DELTA, Accountant.RDP))
    new_run, _ = ledger.projected(ROUND, DELTA, Accountant.RDP, None)
    assert new_run < run_after


def test_reopened_ledger_reports_the_same_epsilon(ledger):
    _train_round(ledger, "run-a", 1)
    _train_round(ledger, "run-a", 2)
    before = ledger.epsilon(DELTA, Accountant.RDP)

    reopened = PrivacyLedger(ledger_file(ledger.path.parent))

    assert reopened.epsilon(DELTA, Accountant.RDP) == before
    assert reopened.entries() == ledger.entries()


def test_torn_last_line_is_ignored_then_cut_off(ledger, caplog):
    _train_round(ledger, "run-a", 1)
    before = ledger.epsilon(DELTA, Accountant.RDP)
    with ledger.path.open("ab") as f:
        f.write(b'{"kind":"reserve","id":"12')  # crash during the append

    with caplog.at_level(logging.WARNING):
        assert ledger.epsilon(DELTA, Accountant.RDP) == before
    assert "partial line" in caplog.text

    _train_round(ledger, "run-a", 2)  # the next append removes the torn tail
    assert [e["kind"] for e in _lines(ledger.path)] == ["reserve", "commit"] * 2


def test_complete_last_line_without_newline_still_counts(ledger):
    entry_id = _train_round(ledger, "run-a", 1)
    ledger.path.write_bytes(ledger.path.read_bytes().rstrip(b"\n"))

    assert len(ledger.history()) == 1
    _train_round(ledger, "run-a", 2)
    assert [e["id"] for e in _lines(ledger.path)][:2] == [entry_id, entry_id]


def test_edited_middle_line_stops_the_site(ledger):
    _train_round(ledger, "run-a", 1)
    _train_round(ledger, "run-a", 2)
    lines = ledger.path.read_text().splitlines(keepends=True)
    edited = lines[1].replace('"steps": 5', '"steps": 1')
    assert edited != lines[1]
    ledger.path.write_text("".join([lines[0], edited, *lines[2:]]))

    with pytest.raises(DataError) as err:
        ledger.epsilon(DELTA, Accountant.RDP)

    assert "line 2" in err.value.message and str(ledger.path) in err.value.message
    assert "must not train" in err.value.hint
    with pytest.raises(DataError):
        _train_round(ledger, "run-a", 3)  # no appending to a damaged ledger


def test_unreadable_middle_line_stops_the_site(ledger):
    _train_round(ledger, "run-a", 1)
    first, *rest = ledger.path.read_bytes().splitlines(keepends=True)
    ledger.path.write_bytes(b"".join([first, b"garbage\n", *rest]))

    with pytest.raises(DataError, match="line 2: not valid JSON"):
        ledger.history()


def test_commit_needs_its_reservation(ledger):
    entry_id = _train_round(ledger, "run-a", 1)

    with pytest.raises(DataError, match="no reservation"):
        ledger.commit("0" * 32, 1, epsilon_run=0.0, epsilon_total=0.0)
    with pytest.raises(DataError, match="already committed"):
        ledger.commit(entry_id, 1, epsilon_run=0.0, epsilon_total=0.0)


def test_ledger_file_and_folder_are_private(ledger):
    _train_round(ledger, "run-a", 1)

    assert ledger.path.name == "ledger.jsonl"
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.path.parent.stat().st_mode) == 0o700


def test_every_line_records_the_mechanism_and_its_context(ledger):
    entry_id = _train_round(ledger, "run-a", 3)

    reserve, commit = ledger.entries()

    assert reserve["id"] == commit["id"] == entry_id
    assert reserve["run"] == "run-a" and reserve["round"] == 3
    assert reserve["noise_multiplier"] == 2.0 and reserve["sample_rate"] == 0.02
    assert reserve["accountant"] == "rdp" and reserve["base_model"] == FINGERPRINT
    assert commit["steps"] == 5 and commit["time"] >= reserve["time"]


def _reserve_many(path, count):
    ledger = PrivacyLedger(path)
    for i in range(count):
        ledger.reserve(
            "run-a",
            i,
            ROUND,
            delta=DELTA,
            max_grad_norm=1.0,
            accountant="rdp",
            base_model=FINGERPRINT,
        )


def test_concurrent_writers_keep_every_line_whole(ledger):
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_reserve_many, args=(ledger.path, 25)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    assert [w.exitcode for w in workers] == [0] * 4
    assert len(ledger.history()) == 100


def test_commit_to_a_missing_ledger_does_not_create_one(ledger):
    with pytest.raises(DataError, match="missing"):
        ledger.commit("0" * 32, 1, epsilon_run=0.0, epsilon_total=0.0)

    assert not ledger.path.exists()


def _sealed_line(body: dict) -> str:
    """``body`` with its own sha256, as a ledger line (no chaining)."""
    from wardround.ops.jsonl_log import sha256_seal

    return json.dumps({**body, "sha256": sha256_seal(body)}, sort_keys=True) + "\n"


def _resealed(line: str) -> str:
    """``line`` with its own sha256 recomputed, as someone who edits it would."""
    return _sealed_line({k: v for k, v in json.loads(line).items() if k != "sha256"})


def test_every_line_repeats_the_seal_of_the_line_before_it(ledger):
    from wardround.ops.jsonl_log import GENESIS

    _train_round(ledger, "run-a", 1)
    _train_round(ledger, "run-a", 2)
    lines = _lines(ledger.path)

    assert [e["v"] for e in lines] == [2] * 4
    assert lines[0]["prev"] == GENESIS
    assert [e["prev"] for e in lines[1:]] == [e["sha256"] for e in lines[:-1]]
    assert all("prev" not in e and "sha256" not in e for e in ledger.entries())


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda lines: [lines[0], *lines[2:]], id="a round deleted"),
        pytest.param(
            lambda lines: [lines[0], lines[2], lines[1], lines[3]], id="reordered"
        ),
        pytest.param(
            lambda lines: [
                lines[0],
                _resealed(lines[1].replace('"steps": 5', '"steps": 1')),
                *lines[2:],
            ],
            id="edited and resealed",
        ),  # fmt: skip
    ],
)
def test_a_line_deleted_moved_or_resealed_breaks_the_chain(ledger, tamper):
    _train_round(ledger, "run-a", 1)
    _train_round(ledger, "run-a", 2)
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(tamper(lines)))

    with pytest.raises(DataError, match="prev does not match") as err:
        ledger.history()
    assert "must not train" in err.value.hint


def _unchained_line(**body) -> str:
    """A version-1 line: sealed alone, no ``prev`` (as ledgers were first written)."""
    return _sealed_line({"v": 1, **body})


V1_RESERVE = {
    "kind": "reserve", "id": "a" * 32, "run": "old-run", "round": 1, "time": 1.0,
    "noise_multiplier": 2.0, "sample_rate": 0.02, "steps": 5, "delta": DELTA,
    "max_grad_norm": 1.0, "accountant": "rdp", "base_model": FINGERPRINT,
}  # fmt: skip
V1_COMMIT = {
    "kind": "commit", "id": "a" * 32, "steps": 5, "time": 2.0,
    "epsilon_run": None, "epsilon_total": None,
}  # fmt: skip


def test_a_version_1_ledger_counts_and_the_chain_goes_on_from_its_last_line(ledger):
    ledger.path.write_text(_unchained_line(**V1_RESERVE) + _unchained_line(**V1_COMMIT))
    assert ledger.history() == [ROUND]

    _train_round(ledger, "run-b", 1)

    lines = _lines(ledger.path)
    assert [e["v"] for e in lines] == [1, 1, 2, 2]
    assert lines[2]["prev"] == lines[1]["sha256"]
    assert ledger.history() == [ROUND, ROUND]


def test_a_version_1_line_after_the_chain_began_is_damage(ledger):
    _train_round(ledger, "run-a", 1)
    with ledger.path.open("a") as handle:
        handle.write(_unchained_line(**V1_RESERVE))

    with pytest.raises(DataError, match="line 3: an unchained"):
        ledger.history()
