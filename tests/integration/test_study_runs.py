"""The learning-quality study at its smallest size: every kind of arm runs through
the real ServerApp round loop and ClientApps (in-process grid), pooled beats chance,
the outputs have their schema, and a second call reuses every finished arm."""

import json

import pytest
from typer.testing import CliRunner

from wardround.cli import app
from wardround.simulations.study.plan import StudySettings, StudySize
from wardround.simulations.study.runner import run_study, write_docs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    settings = StudySettings.for_size(StudySize.SMOKE)
    result = run_study(settings, out, command="test")
    return settings, out, result


def test_smoke_study_runs_every_arm_and_pooled_beats_chance(smoke_study):
    settings, out, result = smoke_study
    data = json.loads((out / "study.json").read_text())

    assert result.failed == [] and data["failures"] == {}
    arms = data["summary"]["3"]
    assert set(arms) == {a.name for a in settings.arms}
    assert arms["pooled"]["auroc"]["mean"] > 0.5
    for name, entry in arms.items():
        assert entry["seeds"] == 1, name
        assert set(entry["per_site"]) == {"site-01", "site-02", "site-03"}
        assert len(entry["per_round"]) == settings.rounds + 1
        assert 0.0 <= entry["auroc"]["mean"] <= 1.0
        assert entry["ratio_to_pooled"] > 0
    assert arms["fedavg"]["sites_above_local"] in range(4)
    assert arms["fedavg-dp-eps8"]["epsilon"]["mean"] <= 8.0 * 1.001
    assert arms["fedavg-secagg"]["upload_bytes_per_site_per_round"]["mean"] > 0
    # SecAgg+ changes the mean delta by its quantization error only
    assert arms["fedavg-secagg"]["auroc"]["mean"] == pytest.approx(
        arms["fedavg"]["auroc"]["mean"], abs=0.01
    )
    subgroups = arms["fedavg"]["subgroups"]
    assert set(subgroups) == {"overall", "sex", "age", "site"}
    assert sum(g["n"] for g in subgroups["site"].values()) == sum(
        arms["fedavg"]["validation_examples"].values()
    )
    assert {g["key"] for g in data["goals"]} == {
        "federated_vs_pooled",
        "every_site_above_local",
        "dp_vs_pooled",
        "fused_vs_best_single",
    }
    assert data["settings"]["heterogeneity"]["label_skew"] > 0
    assert "## Learning quality" in (out / "report.md").read_text()
    assert all(
        (out / "plots" / f"{p}.png").stat().st_size > 0
        for p in ("rounds", "privacy", "sites")
    )


def test_a_second_call_reuses_every_finished_arm(smoke_study):
    settings, out, first = smoke_study

    again = run_study(settings, out, command="test")

    assert again.ran == 0 and again.cached == first.ran
    assert again.data["summary"] == first.data["summary"]


def test_write_docs_rewrites_only_the_study_section(smoke_study, tmp_path):
    _, _, result = smoke_study
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written\n")

    write_docs(result, docs)
    once = docs.read_text()
    write_docs(result, docs)

    assert once.startswith("# Benchmarks\n\nhand-written\n")
    assert "<!-- study:quality:start -->" in once and docs.read_text() == once
    assert "(plots/study-quality-rounds.png)" in once
    assert (tmp_path / "plots" / "study-quality-sites.png").is_file()


def test_study_command_is_registered_and_rejects_bad_options(tmp_path):
    runner = CliRunner()

    help_text = runner.invoke(app, ["study", "quality", "--help"]).output
    bad = runner.invoke(
        app, ["study", "quality", "--size", "huge", "--out", str(tmp_path)]
    )

    assert "--write-docs" in help_text and "--seeds" in help_text
    assert bad.exit_code == 2 and "smoke or full" in bad.output
