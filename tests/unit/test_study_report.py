"""The learning-quality study's summary, goals, 'keeps X of pooled' table, report,
plots and docs sections, from hand-made arm outcomes (no training)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from wardround.simulations.reporting import replace_marked_section
from wardround.simulations.study.arms import ArmOutcome
from wardround.simulations.study.goals import evaluate_goals
from wardround.simulations.study.plan import StudySettings, StudySize
from wardround.simulations.study.plots import write_plots
from wardround.simulations.study.report import render_report
from wardround.simulations.study.summary import dp_worth, summarise

LABELS = ("nodule", "effusion", "pneumonia", "cardiomegaly")


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


def test_dp_fedavg_is_judged_against_the_classical_model_trained_the_same_way():
    settings = _two_sizes()
    values = _two_size_values()
    cells = {"40x3-pretrained": 0.70, "80x3-pretrained": 0.80}  # classical DP ε=8
    for key, classical_dp in cells.items():
        values[key] = {
            **values[key],
            "classical-pooled": 0.85,
            "classical-fedavg-dp-eps8": classical_dp,
        }
    summary = summarise(settings, _results(settings, values), LABELS)

    goals = {
        g.cell: g
        for g in evaluate_goals(settings, summary)
        if g.key == "above_classical_dp"
    }

    assert set(goals) == set(cells)
    for key, g in goals.items():
        diff = _site_mean(values[key]["fedavg-dp-eps8"]) - _site_mean(cells[key])
        assert g.value == pytest.approx(diff) and g.met == (diff >= 0)
        assert "classical FedAvg + DP ε=8" in g.goal
    assert {g.met for g in goals.values()} == {True, False}
    # the pooled bar stays beside it
    pooled_bar = [
        g for g in evaluate_goals(settings, summary) if g.key == "above_classical"
    ]
    assert any("FedAvg + DP ε=8" in g.goal and not g.met for g in pooled_bar)


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


def test_site_margins_are_compared_at_the_precision_sites_report():
    from wardround.simulations.study.summary import site_margin

    # a site's reported 0.708 against a local model's unrounded 0.7083333: a tie
    assert site_margin(0.708, 0.7083333) == 0.0
    assert str(site_margin(0.708, 0.7083333)) == "0.0"  # not -0.0
    assert site_margin(0.712, 0.7083333) == 0.004
    assert site_margin(0.700, 0.7083333) == -0.008
    # a site that reports 1 decimal: its 0.8 is 0.75..0.85, not above 0.783
    assert site_margin(0.8, 0.783, decimals=1) == 0.0


def test_a_site_reporting_fewer_decimals_is_compared_at_its_own_precision():
    values = _two_size_values()
    values["40x3-pretrained"] = {
        **values["40x3-pretrained"],
        "local": {"site-01": 0.783, "site-02": 0.70, "site-03": 0.70},
        "fedavg": {"site-01": 0.8, "site-02": 0.75, "site-03": 0.75},
    }
    at_3 = _two_sizes()
    at_1 = replace(at_3, site_decimals={"site-01": 1})

    above = {
        name: summarise(s, _results(s, values), LABELS)["40x3-pretrained"]["fedavg"][
            "sites_above_local"
        ]
        for name, s in (("3", at_3), ("1", at_1))
    }

    assert above == {"3": 3, "1": 2}


def test_the_privacy_plot_draws_only_the_fusion_models_dp_arms():
    from wardround.simulations.study.plots import _dp_points

    arms = {
        "fedavg-dp-eps8": {"seeds": 1, "target_epsilon": 8.0, "classical": False},
        "classical-fedavg-dp-eps8": {
            "seeds": 1,
            "target_epsilon": 8.0,
            "classical": True,
        },
        "fedavg-dp-eps8-secagg": {
            "seeds": 1,
            "target_epsilon": 8.0,
            "secure_aggregation": True,
        },
    }
    assert [entry for _, entry in _dp_points(arms)] == [arms["fedavg-dp-eps8"]]


def test_a_site_without_an_arms_inputs_is_left_out_of_that_arms_figures():
    settings = replace(_two_sizes(), site_gaps={"site-03": ("image",)})
    values = _two_size_values()
    # site-03 has no images: the image-only model's constant prediction ties (0.5)
    image_only = {"site-01": 0.90, "site-02": 0.88, "site-03": 0.5}
    fused = {"site-01": 0.93, "site-02": 0.93, "site-03": 0.60}
    values["40x3-pretrained"] = {
        **values["40x3-pretrained"],
        "fedavg-image-only": image_only,
        "fedavg": fused,
    }
    summary = summarise(settings, _results(settings, values), LABELS)

    arms = summary["40x3-pretrained"]
    entry = arms["fedavg-image-only"]
    assert entry["auroc"]["mean"] == pytest.approx(0.89)
    assert np.isnan(entry["per_site"]["site-03"]["mean"])
    assert entry["unscored_sites"] == {
        "site-03": "site-03 has no images in its validation split"
    }
    assert [v["mean"] for v in entry["per_label"].values()] == pytest.approx(
        [0.89] * len(LABELS)
    )
    assert "unscored_sites" not in arms["fedavg"]  # it has EHR and notes there
    # its ratio to pooled is to pooled on the same sites (0.80 and 0.81)
    assert entry["ratio_to_pooled"] == pytest.approx(0.89 / 0.805)
    # the fused model is compared with image-only on the sites that have images
    concat = next(
        g
        for g in evaluate_goals(settings, summary)
        if g.key == "fused_vs_best_single" and "(concat)" in g.goal
    )
    assert "image only" in concat.measured and "not site-03" in concat.measured
    assert concat.value == pytest.approx(0.93 - 0.89)
    assert concat.met
    text = render_report(
        json.loads(json.dumps(_study_data(settings, summary))),
        {},
        relative_to=Path("."),
    )
    assert "fedavg-image-only: site-03 has no images in its validation split" in text


def test_the_fused_model_is_held_to_the_single_modality_it_leads_by_least():
    settings = replace(_two_sizes(), site_gaps={"site-03": ("image",)})
    values = _two_size_values()
    values["40x3-pretrained"] = {
        **values["40x3-pretrained"],
        # image only looks best on its 2 sites; EHR only is 0.96 on those same sites
        "fedavg-image-only": {"site-01": 0.90, "site-02": 0.88, "site-03": 0.5},
        "fedavg-ehr-only": {"site-01": 0.96, "site-02": 0.96, "site-03": 0.50},
        "fedavg": {"site-01": 0.93, "site-02": 0.93, "site-03": 0.60},
    }
    summary = summarise(settings, _results(settings, values), LABELS)

    concat = next(
        g
        for g in evaluate_goals(settings, summary)
        if g.key == "fused_vs_best_single" and "(concat)" in g.goal
    )

    # on all 3 sites: fused 0.82 against EHR only 0.807; image only is +0.04 behind
    assert "ehr only" in concat.measured
    assert concat.value == pytest.approx(0.82 - (0.96 + 0.96 + 0.50) / 3)
    assert not concat.met
    text = render_report(
        json.loads(json.dumps(_study_data(settings, summary))),
        {},
        relative_to=Path("."),
    )
    line = next(x for x in text.splitlines() if x.startswith("- **Modalities**"))
    assert "concat 0.820 (+0.013)" in line and "best single ehr only" in line
