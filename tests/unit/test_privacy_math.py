import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from wardround.common import privacy
from wardround.common.config import Accountant
from wardround.common.errors import ConfigError, PrivacyBudgetExhausted
from wardround.common.privacy import (
    PRV_MAX_MECHANISMS,
    LocalSchedule,
    Mechanism,
    check_round_budget,
    epsilon_spent,
    local_schedule,
    merge_history,
    plan_noise_multiplier,
)

DELTA = 1e-5


def _stepped(accountant, history):
    """An Opacus accountant stepped one DP-SGD step at a time, as training does."""
    for m in history:
        for _ in range(m.steps):
            accountant.step(
                noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate
            )
    return accountant.get_epsilon(DELTA)


@pytest.mark.parametrize(
    ("accountant", "sample_rate", "rounds", "steps"),
    [(Accountant.RDP, 0.05, 4, 10), (Accountant.PRV, 0.05, 4, 10)],
)
def test_sigma_planned_for_the_whole_schedule_reaches_the_target(
    accountant, sample_rate, rounds, steps
):
    target = 1.0

    sigma = plan_noise_multiplier(
        target, DELTA, sample_rate, rounds * steps, accountant
    )
    rounds_history = [Mechanism(sigma, sample_rate, steps)] * rounds
    spent = epsilon_spent(rounds_history, DELTA, accountant)
    one_round = epsilon_spent(rounds_history[:1], DELTA, accountant)

    assert spent <= target
    assert spent >= target - 0.02  # Opacus's search stops within 0.01 below
    assert one_round < 0.7 * target  # a per-round plan would overspend R-fold-ish


def test_planning_sigma_warns_nothing():
    # the search's large-sigma trials are bounded at Opacus's largest order: valid
    # bounds, and on a site's terminal (site check, site approve) only noise
    import warnings

    plan_noise_multiplier.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma = plan_noise_multiplier(8.0, DELTA, 0.125, 80, Accountant.RDP)
    assert 0.5 < sigma < 2.0


def test_unreachable_target_is_a_config_error():
    # RDP cannot certify epsilon below ~log(1/delta)/62 whatever sigma is.
    with pytest.raises(ConfigError, match="target-epsilon"):
        plan_noise_multiplier(0.05, DELTA, 0.05, 40, Accountant.RDP)


def test_rdp_epsilon_equals_a_stepped_opacus_accountant():
    history = [
        Mechanism(1.2, 0.05, 3),
        Mechanism(0.9, 0.1, 2),
        Mechanism(1.2, 0.05, 4),  # same mechanism again, after another one
    ]

    ours = epsilon_spent(history, DELTA, Accountant.RDP)

    assert ours == pytest.approx(_stepped(RDPAccountant(), history), rel=1e-12)


def test_prv_epsilon_equals_a_stepped_opacus_accountant():
    history = [Mechanism(3.0, 0.05, 6), Mechanism(2.0, 0.1, 3)]

    ours = epsilon_spent(history, DELTA, Accountant.PRV)

    assert ours == pytest.approx(_stepped(PRVAccountant(), history), rel=1e-9)
    assert ours < epsilon_spent(history, DELTA, Accountant.RDP)


def test_merging_interleaved_mechanisms_stays_within_prv_error():
    interleaved = [Mechanism(3.0, 0.05, 3), Mechanism(2.0, 0.1, 3)] * 2

    ours = epsilon_spent(interleaved, DELTA, Accountant.PRV)
    opacus = _stepped(PRVAccountant(), interleaved)  # four entries, unmerged

    assert merge_history(interleaved) == [(3.0, 0.05, 6), (2.0, 0.1, 6)]
    assert ours == pytest.approx(opacus, abs=0.02)  # PRV's eps_error is 0.01


@pytest.mark.parametrize("accountant", list(Accountant))
def test_empty_or_zero_step_history_spends_nothing(accountant):
    assert epsilon_spent([], DELTA, accountant) == 0.0
    assert epsilon_spent([Mechanism(1.0, 0.1, 0)], DELTA, accountant) == 0.0


def test_prv_falls_back_to_rdp_beyond_its_mechanism_limit(caplog):
    # q = 1 keeps RDP closed-form (fast); each sigma is a distinct mechanism.
    many = [Mechanism(2.0 + 0.1 * i, 1.0, 1) for i in range(PRV_MAX_MECHANISMS + 1)]

    with caplog.at_level(logging.WARNING):
        prv = epsilon_spent(many, DELTA, Accountant.PRV)

    assert prv == epsilon_spent(many, DELTA, Accountant.RDP)
    assert "PRV accounting skipped" in caplog.text


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "max_steps", "expected"),
    [
        (96, 32, 1, 0, LocalSchedule(1 / 3, 3)),
        (100, 32, 2, 0, LocalSchedule(0.25, 8)),  # q = 1/ceil(n/B), not B/n
        (5, 32, 3, 0, LocalSchedule(1.0, 3)),
        (1000, 10, 2, 50, LocalSchedule(0.01, 50)),
        (1000, 10, 1, 500, LocalSchedule(0.01, 100)),
        (2976, 32, 1, 0, LocalSchedule(1 / 93, 92)),  # Opacus's int(1/q) quirk
    ],
)
def test_local_schedule(n, batch, epochs, max_steps, expected):
    assert local_schedule(n, batch, epochs, max_steps) == expected


@pytest.mark.parametrize(("n", "batch"), [(100, 32), (2976, 32), (3168, 32), (7, 2)])
def test_local_schedule_matches_opacus_dp_data_loader(n, batch):
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
    poisson = DPDataLoader.from_data_loader(loader)

    schedule = local_schedule(n, batch, 1, 0)

    assert schedule.sample_rate == poisson.sample_rate
    assert schedule.steps_per_round == len(poisson)


def test_local_schedule_without_examples_is_a_config_error():
    with pytest.raises(ConfigError, match="no training examples"):
        local_schedule(0, 32, 1, 0)


def test_round_within_both_limits_passes():
    check_round_budget(2.0, 10.0, max_epsilon_per_run=2.0, budget_epsilon=30.0)


def test_round_past_the_run_maximum_is_refused():
    with pytest.raises(PrivacyBudgetExhausted) as err:
        check_round_budget(
            8.4,
            12.0,
            max_epsilon_per_run=8.0,
            budget_epsilon=30.0,
            run_eps_before=7.9,
        )

    text = str(err.value)
    assert "per-run maximum" in text and "lifetime" not in text
    assert "7.900" in text and "8.400" in text and "8.000" in text
    assert "budget-epsilon" in text  # the hint


def test_round_past_both_limits_names_both():
    with pytest.raises(PrivacyBudgetExhausted) as err:
        check_round_budget(9.0, 31.0, max_epsilon_per_run=8.0, budget_epsilon=30.0)

    assert "per-run maximum" in err.value.message
    assert "lifetime budget" in err.value.message and "31.000" in err.value.message


def test_non_finite_epsilon_is_refused():
    with pytest.raises(PrivacyBudgetExhausted):
        check_round_budget(math.nan, 1.0, max_epsilon_per_run=8.0, budget_epsilon=30.0)


@settings(max_examples=15, deadline=None)
@given(
    sigma=st.floats(0.8, 3.0),
    q=st.floats(0.001, 0.05),
    steps=st.integers(1, 200),
    extra=st.integers(1, 100),
)
def test_rdp_epsilon_grows_with_steps_and_shrinks_with_sigma(sigma, q, steps, extra):
    base = epsilon_spent([Mechanism(sigma, q, steps)], DELTA, Accountant.RDP)
    longer = epsilon_spent([Mechanism(sigma, q, steps + extra)], DELTA, Accountant.RDP)
    noisier = epsilon_spent([Mechanism(sigma * 1.5, q, steps)], DELTA, Accountant.RDP)

    assert longer >= base
    assert noisier <= base


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.4, 3.0), st.floats(0.001, 1.0), st.integers(1, 5000)),
        min_size=1,
        max_size=3,
    ),
    st.floats(1e-8, 1e-3),
)
def test_the_kept_one_step_rdp_gives_opacus_epsilon_to_the_bit(entries, delta):
    """A run's RDP epsilon is recomputed every round; the one-step RDP per (q, σ) is
    kept, and the answer must be exactly Opacus's."""
    from wardround.common.privacy import _rdp_epsilon

    opacus = RDPAccountant()
    opacus.history = list(entries)
    expected = float(opacus.get_epsilon(delta))

    got = _rdp_epsilon(tuple(entries), delta)

    assert got == expected or (math.isinf(got) and math.isinf(expected))


@pytest.mark.parametrize(
    "history",
    [
        [Mechanism(0.9729, 1 / 7, 14)],  # a simulated site's first round
        [Mechanism(0.9729, 1 / 7, 42)],
        [Mechanism(3.0, 0.05, 6), Mechanism(2.0, 0.1, 3)],
        [Mechanism(0.6, 0.5, 2), Mechanism(1.5, 0.01, 400), Mechanism(1.1, 1.0, 1)],
    ],
)
def test_prv_epsilon_is_opacus_prv_accountants_to_the_bit(history):
    # The domain is sized from kept RDP vectors instead of fresh RDP accountants.
    assert privacy._prv_accountant_class() is not PRVAccountant
    opacus = PRVAccountant()
    opacus.history = merge_history(history)

    expected = opacus.get_epsilon(DELTA)

    assert epsilon_spent(history, DELTA, Accountant.PRV) == expected


def test_another_opacus_release_keeps_opacus_own_prv_accountant(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.7.0")
    privacy._prv_accountant_class.cache_clear()
    try:
        assert privacy._prv_accountant_class() is PRVAccountant
    finally:
        monkeypatch.undo()
        privacy._prv_accountant_class.cache_clear()
