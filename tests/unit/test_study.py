"""The learning-quality study's pure parts: statistics, subgroups, plan (cells over
base × patients per site × DP, keys, seeds), the 'keeps X of pooled' table, goals,
report and plots, docs sections, and the generator's heterogeneity settings."""

from __future__ import annotations

import json
import math
from dataclasses import replace
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
from wardround.simulations.study.goals import evaluate_goals
from wardround.simulations.study.plan import ArmGroup, Cell, StudySettings, StudySize
from wardround.simulations.study.plots import write_plots
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
from wardround.simulations.study.summary import (
    dp_worth,
    fmt,
    summarise,
)
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
def _names(arms) -> set[str]:
    return {a.name for a in arms}


def test_full_study_crosses_base_size_and_dp_with_the_ablations_at_the_smallest():
    settings = StudySettings.for_size(StudySize.FULL)
    cells = {c.key: c for c in settings.cells()}
    axis = {a.name for a in settings.arms if a.privacy_axis}

    assert settings.patients == (200, 1000, 3000)
    assert settings.bases == ("pretrained", "random")
    assert axis == {
        "pooled",
        "local",
        "fedavg",
        "fedavg-dp-eps1",
        "fedavg-dp-eps3",
        "fedavg-dp-eps8",
        "classical-pooled",
        "classical-local",
        "classical-fedavg",
        "classical-fedavg-dp-eps1",
        "classical-fedavg-dp-eps3",
        "classical-fedavg-dp-eps8",
    }
    # every arm at 200 patients, 3 sites, pretrained
    assert _names(settings.arms_for(cells["200x3-pretrained"])) == _names(settings.arms)
    assert _names(settings.arms_for(cells["200x3-pretrained"])) >= {
        "fedprox-mu0.1",
        "fedavg-secagg",
        "fedavg-dp-eps8-secagg",
        "fedavg-image-only",
        "fedavg-gated",
        "fedavg-cross-attention",
    }
    # 8 sites: reference, classical and strategy arms, at the smallest size and
    # primary base
    assert {a.group for a in settings.arms_for(cells["200x8-pretrained"])} == {
        ArmGroup.REFERENCE,
        ArmGroup.CLASSICAL,
        ArmGroup.STRATEGY,
    }
    # the privacy axis on both bases at every size, on the ablation site count only
    for patients in settings.patients:
        assert _names(settings.arms_for(Cell(patients, 3, "random"))) == axis
        if patients > 200:
            assert _names(settings.arms_for(Cell(patients, 3, "pretrained"))) == axis
            assert settings.arms_for(Cell(patients, 8, "pretrained")) == ()
            assert settings.arms_for(Cell(patients, 8, "random")) == ()
    assert set(cells) == {
        "200x3-pretrained",
        "200x3-random",
        "200x8-pretrained",
        "1000x3-pretrained",
        "1000x3-random",
        "3000x3-pretrained",
        "3000x3-random",
    }
    # fewer seeds at the larger sizes
    assert [len(settings.seeds_for(p)) for p in settings.patients] == [3, 2, 1]
    per_seed_200 = (
        len(settings.arms)
        + len(axis)
        + len(settings.arms_for(cells["200x8-pretrained"]))
    )
    assert settings.arm_count(200) == 3 * per_seed_200
    assert settings.arm_count(1000) == 2 * 2 * len(axis)
    assert settings.arm_count(3000) == 1 * 2 * len(axis)


def test_seeds_are_one_count_or_one_per_size():
    one = StudySettings.for_size(StudySize.FULL, seeds=2)
    each = StudySettings.for_size(StudySize.FULL, patients=(1000, 200), seeds=(4, 1))

    assert [len(one.seeds_for(p)) for p in one.patients] == [2, 2, 2]
    assert each.patients == (200, 1000)  # ascending: the smallest runs every arm
    assert each.seeds_for(1000) == (0, 1, 2, 3) and each.seeds_for(200) == (0,)
    with pytest.raises(ConfigError, match="one per --patients size"):
        StudySettings.for_size(StudySize.FULL, seeds=(3, 1))
    with pytest.raises(ConfigError, match="each size once"):
        StudySettings.for_size(StudySize.FULL, patients=(200, 200), seeds=1)


def test_smoke_runs_the_random_base_only_and_the_first_pretrained_base_is_primary():
    smoke = StudySettings.for_size(StudySize.SMOKE)
    both = StudySettings.for_size(StudySize.SMOKE, bases=("random", "/x/tiny-base"))

    assert smoke.bases == ("random",) and smoke.primary_base == "random"
    assert [c.key for c in smoke.cells()] == ["40x3-random"]
    assert both.primary_base == "/x/tiny-base"
    assert [c.key for c in both.cells()] == ["40x3-tiny-base", "40x3-random"]
    assert _names(both.arms_for(Cell(40, 3, "/x/tiny-base"))) == _names(both.arms)


def test_arm_config_sets_the_arm_the_base_and_leaves_batches_to_the_recipe(tmp_path):
    from wardround.common.recipe import training_recipe

    full = StudySettings.for_size(StudySize.FULL)
    smoke = StudySettings.for_size(StudySize.SMOKE)
    cell = Cell(200, 3, "pretrained")
    arms = {a.name: a for a in full.arms}

    dp = full.arm_config(
        arms["fedavg-dp-eps8-secagg"], cell, str(tmp_path), 1, "r", "/bases/b"
    )
    plain = full.arm_config(arms["fedavg"], Cell(200, 3, "random"), "s", 1, "r")
    small = smoke.arm_config(arms["fedavg-dp-eps8"], Cell(40, 3, "random"), "s", 0, "r")

    assert dp.privacy.enabled and dp.privacy.target_epsilon == 8.0
    assert dp.secure_aggregation.enabled
    assert dp.federation.rounds == full.rounds
    assert dp.federation.min_sites == 3 and dp.model.init_seed == 1
    assert dp.model.base == "/bases/b" and plain.model.base == "random"
    # the study sets no batch size or learning rate: the recipes apply
    assert dp.train.batch_size == 0 and dp.train.learning_rate == 0
    assert training_recipe(dp).batch_size != training_recipe(plain).batch_size
    # the scope is written out as the recipe resolves it, so a site's loaded
    # model (reused per model section) is never one built for the other scope
    assert dp.model.trainable.value == training_recipe(dp).trainable.value == "fusion"
    assert plain.model.trainable.value == "all"
    # the smoke's sites are smaller than the DP batch: its preset sets one
    assert small.train.batch_size == smoke.batch_size > 0
    recipes = full.describe()["recipes"]
    assert recipes["DP-SGD"]["batch_size"] == training_recipe(dp).batch_size
    assert recipes["no DP"]["optimizer"] == training_recipe(plain).optimizer.value


def test_arm_key_changes_with_anything_that_decides_the_result():
    smoke = StudySettings.for_size(StudySize.SMOKE, bases=("pretrained", "random"))
    arm = smoke.arms[2]
    cell = Cell(40, 3, "pretrained")
    key = smoke.arm_key(arm, cell, 0)
    same = StudySettings.for_size(StudySize.SMOKE, bases=("pretrained", "random"))

    assert key == same.arm_key(arm, cell, 0)
    assert key != smoke.arm_key(arm, cell, 1)
    assert key != smoke.arm_key(arm, Cell(40, 4, "pretrained"), 0)
    assert key != smoke.arm_key(smoke.arms[3], cell, 0)
    assert key != smoke.arm_key(arm, Cell(40, 3, "random"), 0)  # the base
    assert key != smoke.arm_key(arm, Cell(80, 3, "pretrained"), 0)  # patients/site
    identity = {"layers_sha256": "ab"}
    assert smoke.arm_key(arm, cell, 0, identity) != key  # which pretrained base
    assert smoke.arm_key(arm, cell, 0, identity) != smoke.arm_key(
        arm, cell, 0, {"layers_sha256": "cd"}
    )


def test_workers_share_every_federation_once_largest_first():
    from wardround.simulations.study.runner import federation_units, shard_units

    settings = StudySettings.for_size(StudySize.FULL)
    units = federation_units(settings)
    shares = [shard_units(settings, units, i, 2) for i in range(2)]

    assert sorted(shares[0] + shares[1]) == sorted(units)
    assert len(units) == sum(len(settings.seeds_for(p)) for p in (200, 1000, 3000)) + 3
    # the one 3,000-patient federation outweighs the rest of its worker's share
    big = next(s for s in shares if (3000, 0, 3) in s)
    assert all(unit[0] == 200 for unit in big if unit != (3000, 0, 3))


def test_a_one_site_study_and_tiny_sites_are_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        StudySettings.for_size(StudySize.SMOKE, site_counts=(1,))
    with pytest.raises(ConfigError, match="at least 10 patients"):
        StudySettings.for_size(StudySize.SMOKE, patients=(5,))


# -- summary, goals, report -------------------------------------------------------------
SITES = ("site-01", "site-02", "site-03")


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


def _per_site(value) -> dict[str, float]:
    """A value per site: one number (then + 0.01 per site) or one per site."""
    if isinstance(value, dict):
        return dict(value)
    return {s: value + 0.01 * i for i, s in enumerate(SITES)}


PRIMARY_VALUES = {
    "pooled": 0.80,
    "local": 0.70,
    "fedavg": 0.79,
    "fedprox-mu0.1": {"site-01": 0.78, "site-02": 0.79, "site-03": 0.5},
    "fedavg-secagg": 0.79,
    "fedavg-dp-eps3": 0.60,
    "fedavg-dp-eps8": {"site-01": 0.74, "site-02": 0.69, "site-03": 0.75},
    "fedavg-dp-eps8-secagg": 0.70,
    "fedavg-image-only": 0.72,
    "fedavg-ehr-only": 0.75,
    "fedavg-note-only": 0.65,
    "fedavg-gated": 0.77,
    "fedavg-cross-attention": 0.70,
}


def _results(settings: StudySettings, values: dict[str, dict]) -> dict:
    """cell key -> arm -> value(s); every seed gets the same outcomes."""
    results = {}
    for cell in settings.cells():
        for arm in settings.arms_for(cell):
            if arm.name not in values.get(cell.key, {}):
                continue
            extra = {}
            if arm.name.startswith("fedavg"):
                extra["upload_bytes_per_round"] = dict.fromkeys(SITES, 1000.0)
            if arm.epsilon is not None:
                extra["epsilon"] = dict.fromkeys(SITES, arm.epsilon)
            outcome = _outcome(_per_site(values[cell.key][arm.name]), **extra)
            for seed in settings.seeds_for(cell.patients):
                results[(cell.key, seed, arm.name)] = outcome
    return results


def _two_sizes() -> StudySettings:
    """40 and 80 patients per site, pretrained and random; DP goals at 80."""
    settings = StudySettings.for_size(
        StudySize.SMOKE, patients=(40, 80), bases=("pretrained", "random")
    )
    return replace(
        settings,
        epsilons=(3.0, 8.0),
        arms=(),
        dp_goal_patients=80,
        local_goal_patients=40,
    )


def _two_size_values() -> dict[str, dict]:
    axis = ("pooled", "local", "fedavg", "fedavg-dp-eps3", "fedavg-dp-eps8")
    return {
        "40x3-pretrained": PRIMARY_VALUES,
        "40x3-random": dict(zip(axis, (0.78, 0.66, 0.77, 0.55, 0.60), strict=True)),
        "80x3-pretrained": dict(zip(axis, (0.84, 0.76, 0.80, 0.70, 0.78), strict=True)),
        "80x3-random": dict(zip(axis, (0.83, 0.75, 0.82, 0.60, 0.65), strict=True)),
    }


def _site_mean(value) -> float:
    return float(np.mean(list(_per_site(value).values())))


def test_dp_worth_says_what_each_epsilon_keeps_of_pooled_on_the_same_base():
    settings = _two_sizes()
    values = _two_size_values()
    summary = summarise(settings, _results(settings, values), LABELS)

    rows = {r["cell"]: r for r in dp_worth(settings, summary)}

    assert set(rows) == set(values)
    for key, row in rows.items():
        pooled = _site_mean(values[key]["pooled"])
        assert row["pooled"] == pytest.approx(pooled)
        assert row["seeds"] == 1
        for eps in ("8", "3"):
            dp = _site_mean(values[key][f"fedavg-dp-eps{eps}"])
            assert row["dp"][eps]["auroc"] == pytest.approx(dp)
            assert row["dp"][eps]["ratio_to_pooled"] == pytest.approx(dp / pooled)
    local = _per_site(values["40x3-pretrained"]["local"])
    dp8 = _per_site(values["40x3-pretrained"]["fedavg-dp-eps8"])
    assert rows["40x3-pretrained"]["dp"]["8"]["sites_above_local"] == sum(
        dp8[s] > local[s] for s in SITES
    )


def test_goals_are_checked_against_their_thresholds():
    settings = _two_sizes()
    values = _two_size_values()
    summary = summarise(settings, _results(settings, values), LABELS)

    checked = evaluate_goals(settings, summary)
    goals = {(g.key, g.cell, g.goal.split()[0]): g for g in checked}

    def ratio_of(cell, arm, to="pooled"):
        return _site_mean(values[cell][arm]) / _site_mean(values[cell][to])

    fedavg = goals[("federated_vs_pooled", "40x3-pretrained", "FedAvg")]
    assert fedavg.met and fedavg.value == pytest.approx(
        ratio_of("40x3-pretrained", "fedavg")
    )
    assert fedavg.patients == 40 and fedavg.sites == 3 and fedavg.base == "pretrained"
    assert goals[("every_site_above_local", "40x3-pretrained", "FedAvg:")].met
    prox = goals[("every_site_above_local", "40x3-pretrained", "FedProx")]
    assert not prox.met and "2 of 3" in prox.measured
    # the strategy goals are the primary base's only
    assert not any(
        g.base == "random" and g.key == "federated_vs_pooled" for g in checked
    )
    # DP vs pooled at the goal size (80): ε=8 ≥ 0.90×, ε=3 ≥ 0.85×
    dp = [g for g in checked if g.key == "dp_vs_pooled"]
    assert {g.cell for g in dp} == {"80x3-pretrained"}
    for g in dp:
        eps = "8" if "ε=8" in g.goal else "3"
        value = ratio_of("80x3-pretrained", f"fedavg-dp-eps{eps}")
        assert g.value == pytest.approx(value)
        assert g.met == (value >= (0.90 if eps == "8" else 0.85))
    assert {g.met for g in dp} == {True, False}  # the inputs meet one, miss one
    # DP ε=8 above every site's local-only model at the local goal size (40)
    above = next(g for g in checked if g.key == "dp_above_local")
    local = _per_site(values["40x3-pretrained"]["local"])
    dp8 = _per_site(values["40x3-pretrained"]["fedavg-dp-eps8"])
    margins = {s: dp8[s] - local[s] for s in SITES}
    worst = min(margins, key=margins.get)
    assert above.cell == "40x3-pretrained"
    assert above.value == sum(m > 0 for m in margins.values())
    assert above.met == all(m > 0 for m in margins.values())
    assert f"{margins[worst]:+.3f} ({worst}" in above.measured
    # pretrained vs random FedAvg, per size, by how much
    base = {g.patients: g for g in checked if g.key == "pretrained_vs_random"}
    for patients, g in base.items():
        diff = _site_mean(values[f"{patients}x3-pretrained"]["fedavg"]) - _site_mean(
            values[f"{patients}x3-random"]["fedavg"]
        )
        assert g.value == pytest.approx(diff) and g.met == (diff >= 0)
        assert f"{diff:+.3f}" in g.measured
    assert set(base) == {40, 80} and {g.met for g in base.values()} == {True, False}
    fused = [g for g in checked if g.key == "fused_vs_best_single"]
    concat = next(g for g in fused if "(concat)" in g.goal)
    best = max(
        _site_mean(PRIMARY_VALUES[f"fedavg-{m}-only"]) for m in ("image", "ehr", "note")
    )
    assert concat.value == pytest.approx(_site_mean(PRIMARY_VALUES["fedavg"]) - best)
    assert concat.met and not next(g for g in fused if "(gated)" in g.goal).met


def test_a_goal_whose_size_did_not_run_is_reported_not_judged():
    settings = replace(StudySettings.for_size(StudySize.SMOKE), dp_goal_patients=1000)
    values = {
        "40x3-random": {
            "pooled": 0.8,
            "local": 0.7,
            "fedavg": 0.79,
            "fedavg-dp-eps8": 0.7,
        }
    }
    summary = summarise(settings, _results(settings, values), LABELS)

    goals = [g for g in evaluate_goals(settings, summary) if g.key == "dp_vs_pooled"]

    assert goals and all(g.met is None and "not run" in g.measured for g in goals)
    data = json.loads(json.dumps(_study_data(settings, summary)))
    text = render_report(data, {}, relative_to=Path("."))
    assert "| 1,000 | 3 | random | FedAvg + DP ε=8" in text
    assert "not run: no 1,000-patient federation in this study | not measured |" in text


def _study_data(settings: StudySettings, summary: dict) -> dict:
    goals = evaluate_goals(settings, summary)
    return {
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
        "bases": {
            "pretrained": {
                "folder": "public-synthetic-0123",
                "corpus": {
                    "kind": "public-synthetic",
                    "sites": 4,
                    "patients_per_site": 1500,
                    "seed": 7,
                },
                "pretrain": {"steps": 400, "batch_size": 128},
                "objective": "cross-modal InfoNCE",
                "init_seed": 0,
                "loss_first": 4.0,
                "loss_last_tenth": 1.5,
                "seconds": 90.0,
                "layers_sha256": "abcdef0123456789",
            },
            "random": None,
        },
        "settings": settings.describe(),
        "summary": summary,
        "dp_worth": dp_worth(settings, summary),
        "goals": [g.to_json() for g in goals],
    }


def test_report_renders_goals_dp_worth_cells_sites_and_subgroups(tmp_path):
    settings = _two_sizes()
    values = _two_size_values()
    results = _results(settings, values)
    results[("40x3-pretrained", 0, "fedavg")] = _outcome(
        {"site-01": 0.79, "site-02": 0.8, "site-03": 0.81},
        subgroups={"sex": {"F": {"auroc": 0.8, "n": 12}, "M": {"auroc": 0.7, "n": 10}}},
    )
    summary = summarise(settings, results, LABELS)
    data = json.loads(json.dumps(_study_data(settings, summary)))  # as study.json
    row = next(r for r in data["dp_worth"] if r["cell"] == "80x3-pretrained")
    x8 = row["dp"]["8"]["ratio_to_pooled"]

    plots = write_plots(data, tmp_path)
    text = render_report(data, plots, relative_to=tmp_path)

    assert set(plots) == {"rounds", "privacy-40", "privacy-80", "sites"}
    assert all(p.stat().st_size > 0 for p in plots.values())
    assert "| 80 | 3 | pretrained | FedAvg + DP ε=8 ≥ 0.9 × pooled AUROC" in text
    assert "**missed**" in text and "**met**" in text
    assert "### Where DP is worth it" in text
    assert (
        f"With 80 patients per site (3 sites, pretrained base), ε=8 keeps {x8:.2f}× "
        "of pooled" in text
    )
    assert "### 40 patients/site, 3 sites, pretrained base" in text
    assert "### 80 patients/site, 3 sites, random base" in text
    assert "| FedAvg | 0.500 | 0.800 | 0.988 |" in text
    assert "| site-03 |" in text and "| sex | F | 12 | 0.800 |" in text
    assert "label skew 1" in text and "4 sites × 1,500 patients" in text
    assert "(privacy-80.png)" in text


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
    cell = Cell(40, 2, "random")

    two = settings.arms_for(cell)

    assert two and not any(a.secure_aggregation for a in two)
    assert {a.name for a in settings.arms_left_out(2)} >= {"fedavg-secagg"}
    assert settings.arms_left_out(3) == ()
    for arm in two:  # every arm that runs has a valid config
        config = settings.arm_config(arm, cell, str(tmp_path), 0, str(tmp_path / "r"))
        assert not config.secure_aggregation.enabled


# -- real sites (--sites-dir) ----------------------------------------------------------
def _site_folders(root, n):
    for i in range(n):
        (root / f"hospital-{i}").mkdir(parents=True)
        (root / f"hospital-{i}" / "site.toml").write_text(f'[site]\nname = "h{i}"\n')
    return root


def test_a_sites_dir_study_is_one_cell_of_its_own_sites(tmp_path):
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, _site_folders(tmp_path, 3))

    (cell,) = settings.cells()
    assert cell.own_data and cell.sites == 3 and cell.key == "sites3-random"
    assert "own data" in cell.label
    assert _names(settings.arms_for(cell)) == _names(settings.arms)


def test_arms_that_need_a_modality_no_site_has_are_skipped_with_the_reason(tmp_path):
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, _site_folders(tmp_path, 3))
    imageless = replace(settings, missing={"image": "no site has images"})

    (cell,) = imageless.cells()
    assert imageless.skipped() == {"fedavg-image-only": "no site has images"}
    assert "fedavg-image-only" not in _names(imageless.arms_for(cell))
    assert "fedavg" in _names(imageless.arms_for(cell))
    assert imageless.describe()["skipped_arms"] == imageless.skipped()


def test_a_sites_dir_needs_two_site_folders(tmp_path):
    with pytest.raises(ConfigError, match="at least 2"):
        StudySettings.for_sites_dir(StudySize.SMOKE, _site_folders(tmp_path, 1))
    with pytest.raises(ConfigError, match="not a folder"):
        StudySettings.for_sites_dir(StudySize.SMOKE, tmp_path / "absent")
