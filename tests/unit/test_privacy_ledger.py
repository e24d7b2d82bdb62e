"""The privacy ledger: what it records composes to exactly Opacus's epsilon."""

import json
import os

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from wardround.client.ledger import PrivacyLedger, ledger_file
from wardround.common.config import Accountant
from wardround.common.errors import DataError, PrivacyBudgetExhausted
from wardround.common.privacy import (
    Mechanism,
    check_round_budget,
    epsilon_spent,
    local_schedule,
    plan_noise_multiplier,
)

DELTA = 1e-5
ROUND = Mechanism(noise_multiplier=1.1, sample_rate=0.05, steps=40)


def _ledger(tmp_path, fingerprint="ab" * 32):
    return PrivacyLedger(ledger_file(tmp_path / "ledger"))


def _round(ledger, run, n, mechanism=ROUND, commit=True):
    entry = ledger.reserve(
        run,
        n,
        mechanism,
        delta=DELTA,
        max_grad_norm=1.0,
        accountant="rdp",
        base_model="ab" * 32,
    )
    if commit:
        ledger.commit(entry, mechanism.steps, epsilon_run=0.0, epsilon_total=0.0)
    return entry


def test_ledger_epsilon_equals_opacus_recomputed_from_the_recorded_history(tmp_path):
    ledger = _ledger(tmp_path)
    _round(ledger, "run-a", 1)
    _round(ledger, "run-a", 2, Mechanism(1.3, 0.08, 25))
    _round(ledger, "run-b", 1, Mechanism(0.9, 0.05, 10))
    # Rebuild the history from the file itself, independently of the ledger code.
    lines = [json.loads(x) for x in ledger.path.read_text().splitlines()]
    steps = {x["id"]: x["steps"] for x in lines if x["kind"] == "commit"}
    history = [
        (x["noise_multiplier"], x["sample_rate"], steps[x["id"]])
        for x in lines
        if x["kind"] == "reserve"
    ]
    for accountant, engine in (
        (Accountant.RDP, RDPAccountant()),
        (Accountant.PRV, PRVAccountant()),
    ):
        engine.history = history
        assert ledger.epsilon(DELTA, accountant) == pytest.approx(
            engine.get_epsilon(DELTA), rel=1e-6
        )


def test_rounds_compose_to_the_epsilon_of_one_opacus_run_with_the_same_steps(tmp_path):
    rounds = 5
    ledger = _ledger(tmp_path)
    for n in range(1, rounds + 1):
        _round(ledger, "run", n)
    one_run = RDPAccountant()
    for _ in range(rounds * ROUND.steps):
        one_run.step(
            noise_multiplier=ROUND.noise_multiplier, sample_rate=ROUND.sample_rate
        )
    assert ledger.epsilon(DELTA, Accountant.RDP, "run") == pytest.approx(
        one_run.get_epsilon(DELTA), rel=1e-9
    )


def test_planned_sigma_spends_the_target_over_the_whole_schedule():
    schedule = local_schedule(
        num_examples=240, batch_size=16, local_epochs=2, max_steps=0
    )
    assert schedule.steps_per_round == 30 and schedule.sample_rate == pytest.approx(
        16 / 240
    )
    sigma = plan_noise_multiplier(
        8.0, DELTA, schedule.sample_rate, 5 * 30, Accountant.RDP
    )
    spent = epsilon_spent(
        [Mechanism(sigma, schedule.sample_rate, 30)] * 5, DELTA, Accountant.RDP
    )
    assert 7.9 <= spent <= 8.05
    # a fresh accountant per round would report far less: composition matters
    assert (
        epsilon_spent(
            [Mechanism(sigma, schedule.sample_rate, 30)], DELTA, Accountant.RDP
        )
        < 0.6 * spent
    )


def test_an_uncommitted_reservation_counts_its_planned_steps(tmp_path):
    ledger = _ledger(tmp_path)
    _round(ledger, "run", 1, commit=False)  # the site crashed mid-round
    restarted = PrivacyLedger(ledger.path)
    assert restarted.history() == [ROUND]
    assert restarted.epsilon(DELTA, Accountant.RDP) > 0


def test_the_ledger_spans_runs_and_restarts(tmp_path):
    ledger = _ledger(tmp_path)
    _round(ledger, "run-a", 1)
    _round(ledger, "run-b", 1)
    again = PrivacyLedger(ledger.path)
    run_a = again.epsilon(DELTA, Accountant.RDP, "run-a")
    total = again.epsilon(DELTA, Accountant.RDP)
    assert total > run_a > 0
    run_after, total_after = again.projected(ROUND, DELTA, Accountant.RDP, "run-a")
    assert run_after == pytest.approx(
        epsilon_spent([ROUND, ROUND], DELTA, Accountant.RDP)
    )
    assert total_after > total


def test_a_torn_last_line_is_ignored_and_a_damaged_line_stops_the_site(tmp_path):
    ledger = _ledger(tmp_path)
    _round(ledger, "run", 1)
    with ledger.path.open("a") as handle:
        handle.write('{"kind": "reserve", "id": "tor')  # crash during the append
    assert len(ledger.history()) == 1
    lines = ledger.path.read_text().splitlines()
    lines[0] = lines[0].replace('"steps": 40', '"steps": 4')  # edited by hand
    ledger.path.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(DataError, match="damaged at line 1"):
        ledger.history()


def test_the_ledger_file_is_private_to_the_site_account(tmp_path):
    ledger = _ledger(tmp_path)
    _round(ledger, "run", 1)
    assert os.stat(ledger.path).st_mode & 0o777 == 0o600


def test_round_budget_refusals_name_the_limit():
    check_round_budget(7.0, 20.0, max_epsilon_per_run=8.0, budget_epsilon=30.0)
    with pytest.raises(PrivacyBudgetExhausted, match="lifetime budget"):
        check_round_budget(7.0, 31.0, max_epsilon_per_run=8.0, budget_epsilon=30.0)
    with pytest.raises(PrivacyBudgetExhausted, match="per-run maximum"):
        check_round_budget(8.5, 20.0, max_epsilon_per_run=8.0, budget_epsilon=30.0)
