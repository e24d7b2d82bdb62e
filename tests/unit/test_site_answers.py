"""The site's answer policy, answer log, run identity and its one ledger."""

from __future__ import annotations

import threading

import pytest

from wardround.client.answers import (
    ANSWER_LOG,
    AnswerKind,
    AnswerLog,
    coarsen_metrics,
)
from wardround.client.ledger import project, site_ledger
from wardround.client.run_identity import approved_run_key, run_identity
from wardround.common import wire
from wardround.common.config import Accountant, RunConfig
from wardround.common.errors import AnswerRefused, ConfigError, PrivacyBudgetExhausted
from wardround.common.privacy import Mechanism, check_round_budget, epsilon_spent
from wardround.sitedata.site_config import SiteAnswers

TRAIN_METRICS = {
    wire.NUM_EXAMPLES: 123,
    wire.SITE_INDEX: -1,
    wire.TRAIN_LOSS: 0.693147,
    wire.TRAIN_STEPS: 4,
    wire.TRAIN_SECONDS: 1.23456,
    wire.DELTA_L2: 0.123456,
    wire.DELTA_CLIPPED: 0,
    wire.DP_EPSILON_RUN: 1.2345678,
    wire.DP_NOISE_MULTIPLIER: 0.987654321,
}


def test_policy_rounds_floats_and_coarsens_counts_upwards():
    out = coarsen_metrics(TRAIN_METRICS, SiteAnswers(), secure_aggregation=False)

    assert out[wire.NUM_EXAMPLES] == 130  # rounded up: a SecAgg+ weight cap holds
    assert out[wire.TRAIN_LOSS] == 0.693 and out[wire.DELTA_L2] == 0.123
    # accounting is a function of the plan: it leaves exact
    assert out[wire.DP_EPSILON_RUN] == TRAIN_METRICS[wire.DP_EPSILON_RUN]
    assert out[wire.DP_NOISE_MULTIPLIER] == TRAIN_METRICS[wire.DP_NOISE_MULTIPLIER]


def test_under_secagg_per_site_training_metrics_stay_home():
    out = coarsen_metrics(TRAIN_METRICS, SiteAnswers(), secure_aggregation=True)

    assert not set(out) & set(wire.PER_SITE_TRAINING_METRICS)
    assert out[wire.TRAIN_STEPS] == 4 and wire.DP_EPSILON_RUN in out


def test_a_dp_round_keeps_what_training_computes_outside_the_noise():
    private = coarsen_metrics(
        TRAIN_METRICS, SiteAnswers(), secure_aggregation=False, private=True
    )
    plain = coarsen_metrics(TRAIN_METRICS, SiteAnswers(), secure_aggregation=False)

    assert wire.TRAIN_LOSS in plain and wire.TRAIN_SECONDS in plain
    assert not set(private) & set(wire.OUTSIDE_DP_TRAINING_METRICS)
    # functions of the noised update and of the plan still leave
    assert private[wire.DELTA_L2] == 0.123 and wire.DP_EPSILON_RUN in private
    assert private[wire.TRAIN_STEPS] == 4


def test_the_number_of_generated_examples_leaves_coarsened():
    out = coarsen_metrics(
        {wire.EVAL_GENERATED: 37}, SiteAnswers(), secure_aggregation=False
    )

    assert out[wire.EVAL_GENERATED] == 40


def test_only_listed_metrics_leave():
    policy = SiteAnswers(metrics=(wire.AUROC_MACRO,), decimals=1)
    values = {wire.AUROC_MACRO: 0.7349, wire.EVAL_LOSS: 0.5, "auroc.edema": 0.61}

    assert coarsen_metrics(values, policy, secure_aggregation=False) == {
        wire.AUROC_MACRO: 0.7
    }
    per_label = SiteAnswers(metrics=(wire.AUROC_PER_LABEL,))
    assert coarsen_metrics(values, per_label, secure_aggregation=False) == {
        "auroc.edema": 0.61
    }


def test_an_unknown_metric_in_the_policy_is_a_config_error(tmp_path):
    from wardround.sitedata.site_config import SiteConfig

    toml = tmp_path / "site.toml"
    toml.write_text('[answers]\nmetrics = ["auroc-macro", "patient-names"]\n')
    with pytest.raises(ConfigError, match="patient-names"):
        SiteConfig.from_toml(toml)


def test_answer_log_allows_rounds_trainings_and_rounds_plus_one_evaluations(tmp_path):
    log = AnswerLog(tmp_path / ANSWER_LOG)
    for server_round in (1, 2):
        log.admit(AnswerKind.TRAIN, "run-a", server_round, approved_rounds=2)
    with pytest.raises(AnswerRefused, match="answered 2 train"):
        log.admit(AnswerKind.TRAIN, "run-a", 1, approved_rounds=2)
    for server_round in (0, 1, 2):
        log.admit(AnswerKind.EVALUATE, "run-a", server_round, approved_rounds=2)
    with pytest.raises(AnswerRefused):
        log.admit(AnswerKind.EVALUATE, "run-a", 2, approved_rounds=2)
    # another approved run has its own allowance; rounds outside the run are refused
    log.admit(AnswerKind.TRAIN, "run-b", 1, approved_rounds=2)
    with pytest.raises(AnswerRefused, match="rounds 1..2"):
        log.admit(AnswerKind.TRAIN, "run-b", 3, approved_rounds=2)
    with pytest.raises(AnswerRefused, match="rounds 1..2"):
        log.admit(AnswerKind.TRAIN, "run-b", 0, approved_rounds=2)
    assert len(AnswerLog(tmp_path / ANSWER_LOG).entries()) == 6


def test_answer_log_racing_threads_get_exactly_the_allowance(tmp_path):
    log = AnswerLog(tmp_path / ANSWER_LOG)
    outcomes: list[bool] = []

    def ask() -> None:
        try:
            AnswerLog(log.path).admit(AnswerKind.TRAIN, "run", 1, approved_rounds=3)
            outcomes.append(True)
        except AnswerRefused:
            outcomes.append(False)

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 3 and len(log.entries()) == 3


def test_a_damaged_answer_log_stops_answers(tmp_path):
    from wardround.common.errors import DataError

    log = AnswerLog(tmp_path / ANSWER_LOG)
    log.admit(AnswerKind.TRAIN, "run", 1, approved_rounds=3)
    log.admit(AnswerKind.TRAIN, "run", 2, approved_rounds=3)
    lines = log.path.read_text().splitlines()
    log.path.write_text(
        lines[0].replace('"round": 1', '"round": 9') + "\n" + lines[1] + "\n"
    )
    with pytest.raises(DataError, match="line 1"):
        log.admit(AnswerKind.TRAIN, "run", 3, approved_rounds=3)


def test_a_torn_last_answer_line_is_cut_off(tmp_path):
    log = AnswerLog(tmp_path / ANSWER_LOG)
    log.admit(AnswerKind.TRAIN, "run", 1, approved_rounds=3)
    with log.path.open("a") as handle:
        handle.write('{"kind": "tra')
    log.admit(AnswerKind.TRAIN, "run", 2, approved_rounds=3)
    assert [e["round"] for e in log.entries()] == [1, 2]


def test_run_identity_is_the_approved_settings_not_the_message():
    config = RunConfig()
    moved = config.with_overrides(output={"dir": "elsewhere", "resume": True})
    changed = config.with_overrides(federation={"rounds": 6})

    assert approved_run_key(moved) == approved_run_key(config)
    assert approved_run_key(changed) != approved_run_key(config)
    deployed = {
        run_identity(config, simulation=False, flower_run=r, named_run=n)
        for r, n in ((1, "a"), (2, "b"), (3, "c"))
    }
    assert deployed == {approved_run_key(config)}
    simulated = {
        run_identity(config, simulation=True, flower_run=r, named_run="x")
        for r in (1, 2)
    }
    assert len(simulated) == 2


def _reserve(ledger, run, base_model, mechanism, admit=None):
    return ledger.reserve(
        run, 1, mechanism, delta=1e-5, max_grad_norm=1.0, accountant="rdp",
        base_model=base_model, admit=admit,
    )  # fmt: skip


def test_one_ledger_per_site_whatever_the_base_model(tmp_path):
    mechanism = Mechanism(1.0, 0.1, 100)
    _reserve(site_ledger(tmp_path), "run-a", "a" * 64, mechanism)
    _reserve(site_ledger(tmp_path), "run-b", "b" * 64, mechanism)  # another init-seed

    ledger = site_ledger(tmp_path)
    assert len(ledger.recorded()) == 2
    alone = epsilon_spent([mechanism], 1e-5, Accountant.RDP)
    assert ledger.epsilon(1e-5, Accountant.RDP) > alone * 1.3


def test_lifetime_epsilon_is_at_the_sites_delta_not_the_runs():
    recorded = [("old", Mechanism(1.0, 0.1, 200))]
    new = Mechanism(1.0, 0.1, 50)
    # a run asking for a loose delta does not loosen the lifetime account
    _, lifetime_site = project(
        recorded, new, "new", run_delta=1e-2, lifetime_delta=1e-6,
        accountant=Accountant.RDP,
    )  # fmt: skip
    _, lifetime_run = project(
        recorded, new, "new", run_delta=1e-2, lifetime_delta=1e-2,
        accountant=Accountant.RDP,
    )  # fmt: skip
    assert lifetime_site > lifetime_run


def test_budget_check_and_reservation_are_one_step(tmp_path):
    """Twelve rounds race for a budget with room for three: three get it."""
    mechanism = Mechanism(1.0, 0.05, 100)
    budget = epsilon_spent([mechanism] * 3, 1e-5, Accountant.RDP) * (1 + 1e-9)

    def admit(recorded):
        _, total = project(
            recorded, mechanism, "run", run_delta=1e-5, lifetime_delta=1e-5,
            accountant=Accountant.RDP,
        )  # fmt: skip
        check_round_budget(
            total, total, max_epsilon_per_run=budget, budget_epsilon=budget
        )

    outcomes: list[bool] = []

    def race() -> None:
        try:
            _reserve(site_ledger(tmp_path), "run", "a" * 64, mechanism, admit)
            outcomes.append(True)
        except PrivacyBudgetExhausted:
            outcomes.append(False)

    threads = [threading.Thread(target=race) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 3
    assert len(site_ledger(tmp_path).recorded()) == 3


def test_identical_refusals_are_audited_in_full_then_nine_a_decade():
    from wardround.client.answer_audit import worth_recording

    recorded = [n for n in range(1, 1001) if worth_recording(n)]
    assert recorded == [*range(1, 11), *range(20, 101, 10), *range(200, 1001, 100)]
    assert sum(worth_recording(n) for n in range(1, 1_000_001)) == 10 + 9 * 5


def test_a_round_answered_once_is_refused_the_second_time_only_when_asked(tmp_path):
    log = AnswerLog(tmp_path / ANSWER_LOG)
    log.admit(AnswerKind.TRAIN, "run", 1, approved_rounds=3, once_per_round=True)
    with pytest.raises(AnswerRefused, match="answers such a round once"):
        log.admit(AnswerKind.TRAIN, "run", 1, approved_rounds=3, once_per_round=True)
    # another round, or a repeat without the rule, is within the allowance
    log.admit(AnswerKind.TRAIN, "run", 2, approved_rounds=3, once_per_round=True)
    log.admit(AnswerKind.TRAIN, "run", 1, approved_rounds=3)
    assert len(log.entries()) == 3


def test_repeatable_rounds_add_to_the_allowance_of_both_kinds(tmp_path):
    log = AnswerLog(tmp_path / ANSWER_LOG)
    for server_round in (1, 1, 2):
        log.admit(AnswerKind.TRAIN, "run", server_round, 2, repeatable=1)
    with pytest.raises(AnswerRefused, match="and 1 repeatable"):
        log.admit(AnswerKind.TRAIN, "run", 2, 2, repeatable=1)
    for server_round in (0, 1, 1, 2):
        log.admit(AnswerKind.EVALUATE, "run", server_round, 2, repeatable=1)
    with pytest.raises(AnswerRefused):
        log.admit(AnswerKind.EVALUATE, "run", 2, 2, repeatable=1)


def test_a_run_key_outlives_upgrades_that_add_settings():
    # Keys of fixed configs, as the release before `repeatable-rounds` computed
    # them: a site that upgrades keeps counting an approved run's epsilon and
    # answers where it left off. A new setting must leave these unchanged.
    assert approved_run_key(RunConfig()) == "81a1086e5344d015b3acdb20da10d3f5"
    plain = RunConfig().with_overrides(
        federation={"rounds": 3}, privacy={"enabled": False}
    )
    assert approved_run_key(plain) == "ef45eaa6686b560661c26328992537a4"
    spare = RunConfig().with_overrides(federation={"repeatable_rounds": 1})
    assert approved_run_key(spare) != approved_run_key(RunConfig())


def test_repeatable_rounds_are_refused_where_a_round_is_answered_once():
    # masked without DP a site answers a round once: a spare could not be used
    with pytest.raises(ConfigError, match="does not apply to SecAgg\\+ runs without"):
        RunConfig().with_overrides(
            federation={"repeatable_rounds": 1}, privacy={"enabled": False}
        )


@pytest.mark.parametrize(
    "clear",
    [
        {"secure_aggregation": {"enabled": False}},
        {"secure_aggregation": {"enabled": False}, "privacy": {"enabled": False}},
    ],
)
def test_repeatable_rounds_are_taken_in_the_clear(clear):
    # a site that died while training answers a round asked again anew: a spare
    config = RunConfig().with_overrides(federation={"repeatable_rounds": 1}, **clear)
    assert config.federation.repeatable_rounds == 1


def test_a_deployed_site_files_generations_under_its_run_and_never_over_one(
    tmp_path,
):
    from types import SimpleNamespace

    from wardround.client.app import write_samples
    from wardround.common import wire as w

    def request(named_run: str, simulation: bool = False):
        return SimpleNamespace(
            runtime=SimpleNamespace(site=SimpleNamespace(cache_path=tmp_path)),
            round_config={w.RUN_ID: named_run},
            run="approved-run-key",
            server_round=2,
            simulation=simulation,
        )

    first = write_samples(request("run-a"), [{"generated": "first"}])
    # the same round named under another run id: a new file beside the first
    second = write_samples(request("run-b"), [{"generated": "second"}])

    assert first.parent == second.parent
    assert first.parent.name == "approved-run-key"
    assert "first" in first.read_text() and "second" in second.read_text()
    assert first.stat().st_mode & 0o777 == 0o600
    # a simulation names its folder by its run id (it copies them into its run)
    simulated = write_samples(request("sim-run", simulation=True), [{"g": 1}])
    assert simulated.parent.name == "sim-run"
