"""The learning-quality study's pure parts: statistics, subgroups, goals, report,
docs sections, plan, and the generator's heterogeneity settings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from wardround.client.data.ehr import encode_ehr
from wardround.client.site_config import EhrSchema
from wardround.common.config import TaskConfig
from wardround.common.errors import ConfigError
from wardround.simulations.reporting import replace_marked_section
from wardround.simulations.study.arms import ArmOutcome
from wardround.simulations.study.plan import ArmGroup, StudySettings, StudySize
from wardround.simulations.study.report import render_report
from wardround.simulations.study.stats import (
    age_band,
    demographics,
    group_order,
    mean_sd,
    ratio,
    site_mean,
    subgroup_auroc,
)
from wardround.simulations.study.summary import evaluate_goals, fmt, summarise
from wardround.simulations.synth import site_profile
from wardround.simulations.synth_notes import NoteStyle, site_cues, write_note
from wardround.simulations.synth_shift import (
    STUDY_HETEROGENEITY,
    Heterogeneity,
    apply_heterogeneity,
)

LABELS = ("nodule", "effusion", "pneumonia", "cardiomegaly")


# -- statistics ---------------------------------------------------------------------
def test_mean_sd_is_the_sample_sd_and_skips_undefined_values():
    assert mean_sd([1.0, 2.0, 3.0]).to_json() == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert mean_sd([0.7, math.nan, None]).n == 1
    one = mean_sd([0.7])
    assert one.mean == 0.7 and math.isnan(one.sd)
    assert mean_sd([]).n == 0 and math.isnan(mean_sd([]).mean)


def test_site_mean_weighs_every_site_once_and_ratio_guards_undefined():
    assert site_mean({"a": 0.6, "b": 0.8, "c": math.nan}) == pytest.approx(0.7)
    assert ratio(0.7, 0.8) == pytest.approx(0.875)
    assert math.isnan(ratio(0.7, 0.0)) and math.isnan(ratio(math.nan, 0.8))


def test_fmt_shows_sd_only_when_defined():
    assert fmt({"mean": 0.7412, "sd": 0.0123, "n": 3}) == "0.741 ± 0.012"
    assert fmt({"mean": 0.7412, "sd": None, "n": 1}) == "0.741"
    assert fmt(None) == "—" and fmt({"mean": None, "sd": None}) == "—"


# -- subgroups ----------------------------------------------------------------------
def test_demographics_reads_sex_and_age_band_from_the_encoded_ehr():
    task = TaskConfig()
    table = pa.table(
        {
            "patient_id": ["p1", "p2", "p3", "p4"],
            "study_uid": ["s1", "s2", "s3", "s4"],
            "age": [45, 72, None, 80],
            "sex": ["F", "M", "M", None],
            **{
                name: pa.array([None] * 4, pa.float64())
                for name in task.numeric
                if name != "age"
            },
            **{name: [1, 0, 0, 1] for name in LABELS},
        }
    )
    encoded = encode_ehr(table, task, EhrSchema())

    sexes, ages = demographics(encoded.features, task)

    assert sexes == ["F", "M", "M", "unknown"]
    assert ages == ["<50", "65–79", "unknown", "≥80"]


@pytest.mark.parametrize(
    ("years", "band"), [(18, "<50"), (49.9, "<50"), (50, "50–64"), (79.9, "65–79")]
)
def test_age_bands_are_half_open(years, band):
    assert age_band(years) == band


def test_subgroup_auroc_per_group_with_undefined_groups_as_nan():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], float)
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.7], [0.1, 0.3], [0.5, 0.5]])
    groups = ["a", "a", "a", "a", "b"]

    out = subgroup_auroc(labels, scores, groups)

    assert out["a"] == {"auroc": 1.0, "n": 4}
    assert out["b"]["n"] == 1 and math.isnan(out["b"]["auroc"])


def test_groups_sort_sexes_then_age_bands_in_order_then_sites():
    names = ["site-02", "≥80", "M", "<50", "unknown", "F", "65–79", "site-01"]
    assert sorted(names, key=group_order) == [
        "F",
        "M",
        "<50",
        "65–79",
        "≥80",
        "unknown",
        "site-01",
        "site-02",
    ]


# -- plan ------------------------------------------------------------------------------
def test_full_study_runs_every_arm_on_three_sites_and_the_core_on_eight():
    settings = StudySettings.for_size(StudySize.FULL)

    three, eight = settings.arms_for(3), settings.arms_for(8)

    assert {a.name for a in three} >= {
        "pooled",
        "local",
        "fedavg",
        "fedprox-mu0.1",
        "fedavg-secagg",
        "fedavg-dp-eps1",
        "fedavg-dp-eps3",
        "fedavg-dp-eps8",
        "fedavg-image-only",
        "fedavg-ehr-only",
        "fedavg-note-only",
        "fedavg-gated",
        "fedavg-cross-attention",
    }
    assert {a.group for a in eight} == {ArmGroup.REFERENCE, ArmGroup.STRATEGY}
    assert len(settings.seeds) >= 3


def test_arm_config_sets_the_arm_and_keeps_the_schedule(tmp_path):
    settings = StudySettings.for_size(StudySize.SMOKE)
    arm = next(a for a in settings.arms if a.name == "fedavg-dp-eps8-secagg")

    config = settings.arm_config(arm, str(tmp_path), 3, 1, str(tmp_path / "run"))

    assert config.privacy.enabled and config.privacy.target_epsilon == 8.0
    assert config.secure_aggregation.enabled
    assert config.federation.rounds == settings.rounds
    assert config.federation.min_sites == 3 and config.model.init_seed == 1


def test_arm_key_changes_with_anything_that_decides_the_result():
    smoke = StudySettings.for_size(StudySize.SMOKE)
    arm = smoke.arms[2]
    key = smoke.arm_key(arm, 3, 0)
    assert key == StudySettings.for_size(StudySize.SMOKE).arm_key(arm, 3, 0)
    assert key != smoke.arm_key(arm, 3, 1)
    assert key != smoke.arm_key(arm, 4, 0)
    assert key != smoke.arm_key(smoke.arms[3], 3, 0)


def test_a_one_site_study_is_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        StudySettings.for_size(StudySize.SMOKE, site_counts=(1,))


# -- summary, goals, report -------------------------------------------------------------
def _outcome(per_site: dict[str, float], **extra) -> ArmOutcome:
    return ArmOutcome(
        per_round=[{s: 0.5 for s in per_site}, per_site],
        per_label={s: dict.fromkeys(LABELS, v) for s, v in per_site.items()},
        train_examples=dict.fromkeys(per_site, 30),
        validation_examples=dict.fromkeys(per_site, 8),
        seconds=1.0,
        cpu_seconds=0.9,
        **extra,
    )


def _results(settings: StudySettings) -> dict:
    sites = ("site-01", "site-02", "site-03")
    values = {
        "pooled": 0.80,
        "local": 0.70,
        "fedavg": 0.79,
        "fedprox-mu0.1": 0.78,
        "fedavg-secagg": 0.79,
        "fedavg-dp-eps8": 0.70,
        "fedavg-dp-eps8-secagg": 0.70,
        "fedavg-image-only": 0.72,
        "fedavg-ehr-only": 0.75,
        "fedavg-note-only": 0.65,
        "fedavg-gated": 0.77,
        "fedavg-cross-attention": 0.70,
    }
    results = {}
    for seed in settings.seeds:
        for arm, value in values.items():
            per_site = {s: value + 0.01 * i for i, s in enumerate(sites)}
            if arm == "fedprox-mu0.1":
                per_site["site-03"] = 0.5  # below its local-only model
            extra = {}
            if arm.startswith("fedavg"):
                extra["upload_bytes_per_round"] = dict.fromkeys(sites, 1000.0)
            if "dp" in arm:
                extra["epsilon"] = dict.fromkeys(sites, 8.0)
            results[(3, seed, arm)] = _outcome(per_site, **extra)
    return results


def test_goals_are_checked_against_their_thresholds():
    settings = StudySettings.for_size(StudySize.SMOKE)
    summary = summarise(settings, _results(settings), LABELS)

    checked = evaluate_goals(settings, summary)
    goals = {(g.key, g.goal.split()[0]): g for g in checked}

    fedavg = goals[("federated_vs_pooled", "FedAvg")]
    assert fedavg.met and fedavg.value == pytest.approx(0.80 / 0.81, rel=1e-6)
    assert goals[("every_site_above_local", "FedAvg:")].met
    prox = goals[("every_site_above_local", "FedProx")]
    assert not prox.met and "2 of 3" in prox.measured
    dp = goals[("dp_vs_pooled", "FedAvg")]
    assert not dp.met and dp.value == pytest.approx(0.71 / 0.81, rel=1e-6)
    fused = [g for g in checked if g.key == "fused_vs_best_single"]
    concat = next(g for g in fused if "(concat)" in g.goal)
    assert concat.met and concat.value == pytest.approx(0.80 - 0.76)
    assert not next(g for g in fused if "(gated)" in g.goal).met


def test_report_renders_goals_arms_sites_and_subgroups():
    settings = StudySettings.for_size(StudySize.SMOKE)
    results = _results(settings)
    results[(3, 0, "fedavg")] = _outcome(
        {"site-01": 0.79, "site-02": 0.8, "site-03": 0.81},
        subgroups={"sex": {"F": {"auroc": 0.8, "n": 12}, "M": {"auroc": 0.7, "n": 10}}},
    )
    summary = summarise(settings, results, LABELS)
    goals = evaluate_goals(settings, summary)
    data = {
        "command": "wardround study quality --size smoke",
        "finished": 0.0,
        "wall_seconds": 60.0,
        "arms_span_seconds": 55.0,
        "arms_run": 12,
        "arms_cached": 0,
        "arm_seconds_total": 50.0,
        "arm_cpu_seconds_total": 45.0,
        "machine": {
            "cpus": 2,
            "cpu_model": "test CPU",
            "memory_gib": 8,
            "gpu": "none",
            "os": "Linux",
            "load_average": 1.0,
        },
        "versions": dict.fromkeys(
            ("python", "torch", "flwr", "opacus", "peft", "transformers", "wardround"),
            "x",
        ),
        "settings": settings.describe(),
        "summary": summary,
        "goals": [g.to_json() for g in goals],
    }

    text = render_report(data, {}, relative_to=Path("."))

    assert "| 3 | FedAvg + DP ε=8 ≥ 0.9 × pooled AUROC |" in text
    assert "**missed**" in text and "**met**" in text
    assert "| FedAvg | 0.500 | 0.800 | 0.988 |" in text
    assert "| site-03 |" in text and "| sex | F | 12 | 0.800 |" in text
    assert "label skew 1" in text


# -- docs sections ---------------------------------------------------------------------
def test_marked_section_is_replaced_in_place_and_appended_when_absent():
    text = "# B\n\nhand-written\n\n<!-- x:start -->\nold\n<!-- x:end -->\n\ntail\n"

    replaced = replace_marked_section(text, "x", "new")
    appended = replace_marked_section("# B\n", "y", "body")

    assert (
        replaced
        == "# B\n\nhand-written\n\n<!-- x:start -->\nnew\n<!-- x:end -->\n\ntail\n"
    )
    assert replace_marked_section(replaced, "x", "new") == replaced
    assert appended == "# B\n\n<!-- y:start -->\nbody\n<!-- y:end -->\n"


# -- the generator's heterogeneity ----------------------------------------------------
def test_no_heterogeneity_leaves_a_profile_as_it_is():
    profile = site_profile(1, 0)
    assert apply_heterogeneity(profile, Heterogeneity(), 0) == profile


def test_study_heterogeneity_is_deterministic_and_differs_between_sites():
    a = [
        apply_heterogeneity(site_profile(i, 3), STUDY_HETEROGENEITY, 3)
        for i in range(4)
    ]
    b = [
        apply_heterogeneity(site_profile(i, 3), STUDY_HETEROGENEITY, 3)
        for i in range(4)
    ]

    assert a == b
    assert len({p.prevalence["pneumonia"] for p in a}) == 4
    assert len({p.scanner.scale for p in a}) == 4
    low, high = STUDY_HETEROGENEITY.scanner_noise
    assert all(low <= p.scanner.noise <= high for p in a)
    assert all(0.03 <= v <= 0.7 for p in a for v in p.prevalence.values())


def test_a_site_dialect_writes_only_its_own_phrases():
    rng = np.random.default_rng(0)
    cues = site_cues(NoteStyle.FULL, 0.5, rng)
    everything = site_cues(NoteStyle.FULL, 0.0, rng)
    dropped = {
        phrase
        for name, phrases in everything.items()
        for phrase in phrases
        if phrase not in cues[name]
    }
    assert all(1 <= len(v) < len(everything[k]) for k, v in cues.items())

    notes = [
        write_note(dict.fromkeys(LABELS, 1), 60, "F", NoteStyle.FULL, rng, cues)
        for _ in range(50)
    ]

    assert not any(p[0].upper() + p[1:] in n for n in notes for p in dropped)


def test_a_two_site_federation_runs_without_the_secagg_arms(tmp_path):
    settings = StudySettings.for_size(StudySize.SMOKE, site_counts=(2,))

    two = settings.arms_for(2)

    assert two and not any(a.secure_aggregation for a in two)
    assert {a.name for a in settings.arms_left_out(2)} >= {"fedavg-secagg"}
    assert settings.arms_left_out(3) == ()
    for arm in two:  # every arm that runs has a valid config
        config = settings.arm_config(arm, str(tmp_path), 2, 0, str(tmp_path / "r"))
        assert not config.secure_aggregation.enabled
