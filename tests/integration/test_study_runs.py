"""The learning-quality study at its smallest size: every kind of arm runs through
the real ServerApp round loop and ClientApps (in-process grid), on a pretrained
base and on the random one, pooled beats chance, the outputs have their schema,
and a second call reuses every finished arm.

The smoke's pretrained base is a tiny folder pretrained here for a few steps
(seconds): the public base for the smoke's shapes would take about a minute to
build. The study's wiring of a base folder is the same as of 'pretrained', which
the runner resolves to the public base's folder.
"""

import json
import tomllib

import pytest
from typer.testing import CliRunner

from wardround.cli import app
from wardround.models.pretraining import PretrainSettings
from wardround.models.public_base import pretrain_base
from wardround.simulations.study.plan import Cell, StudySettings, StudySize
from wardround.simulations.study.runner import run_study, write_docs
from wardround.synthetic.hospitals import synthesize_federation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A base folder pretrained for a few steps on a small corpus, smoke shapes."""
    root = tmp_path_factory.mktemp("tiny-base")
    corpus = synthesize_federation(root / "corpus", 2, patients_per_site=24, seed=99)
    smoke = StudySettings.for_size(StudySize.SMOKE)
    config = smoke.base_config("sites", Cell(40, 3, "random"), 0)
    folder = root / "tiny-base"
    settings = PretrainSettings(steps=3, batch_size=16, warmup_steps=1, threads=1)
    pretrain_base(config, corpus, folder, settings, {"kind": "test corpus"})
    return folder


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("study")
    settings = StudySettings.for_size(StudySize.SMOKE, bases=(str(tiny_base), "random"))
    result = run_study(settings, out, command="test")
    return settings, out, result


def test_smoke_study_runs_every_arm_and_pooled_beats_chance(smoke_study):
    settings, out, result = smoke_study
    data = json.loads((out / "study.json").read_text())

    assert result.failed == [] and data["failures"] == {}
    assert set(data["summary"]) == {"40x3-tiny-base", "40x3-random"}
    arms = data["summary"]["40x3-tiny-base"]
    assert set(arms) == {a.name for a in settings.arms}
    random = data["summary"]["40x3-random"]
    assert set(random) == {a.name for a in settings.arms if a.every_cell}
    assert "fedavg-personal" in random
    assert random["pooled"]["auroc"]["mean"] > 0.5
    assert arms["pooled"]["auroc"]["mean"] > 0.5
    for name, entry in arms.items():
        assert entry["seeds"] == 1, name
        assert set(entry["per_site"]) == {"site-01", "site-02", "site-03"}
        # the classical model fitted once (scikit-learn): untrained and final
        one_fit = entry["classical"] and entry["kind"] != "federated"
        assert len(entry["per_round"]) == (2 if one_fit else settings.rounds + 1)
        # one seed: the arm's AUROC is the mean of its sites' (every site once)
        sites = [
            v["mean"] for v in entry["per_site"].values() if v["mean"] == v["mean"]
        ]
        assert entry["auroc"]["mean"] == pytest.approx(sum(sites) / len(sites)), name
        assert entry["ratio_to_pooled"] > 0
        assert "minus_classical" in entry
    fedavg, local = arms["fedavg"]["per_site"], arms["local"]["per_site"]
    assert arms["fedavg"]["sites"] == 3
    # above at the precision sites report their AUROC (3 decimals): a tie is not
    assert arms["fedavg"]["sites_above_local"] == sum(
        round(fedavg[s]["mean"], 3) > round(local[s]["mean"], 3) for s in fedavg
    )
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
        "fused_vs_best_single",
        "dp_vs_pooled",
        "dp_above_local",
        "pretrained_vs_random",
        "above_classical",
        "above_classical_dp",
        "personal_above_global_and_local",
    }
    # the classical reference beats chance pooled, and its DP FedAvg spends its ε
    assert arms["classical-pooled"]["auroc"]["mean"] > 0.5
    assert arms["classical-fedavg-dp-eps8"]["epsilon"]["mean"] <= 8.0 * 1.001
    assert arms["classical-fedavg"]["auroc"]["mean"] > 0.5
    assert "classical, pooled" in (out / "report.md").read_text()
    assert {r["cell"] for r in data["dp_worth"]} == set(data["summary"])
    assert data["bases"]["random"] is None
    assert data["bases"]["tiny-base"]["pretrain"]["steps"] == 3
    assert data["settings"]["heterogeneity"]["label_skew"] > 0
    report = (out / "report.md").read_text()
    assert "## Learning quality" in report and "### Where DP is worth it" in report
    assert all(
        (out / "plots" / f"{p}.png").stat().st_size > 0
        for p in ("rounds", "privacy-40", "sites")
    )


def test_every_arm_of_a_pretrained_cell_loads_the_base_folder(smoke_study, tiny_base):
    _, out, _ = smoke_study
    runs = out / "arms" / "patients-40" / "sites-3"

    def base_of(cell: str, arm: str) -> str:
        config = runs / cell / "seed-0" / arm / "run" / "run-config.toml"
        return tomllib.loads(config.read_text())["model"]["base"]

    # the single-modality ablations too: the same base, without the other encoders
    for arm in ("fedavg", "fedavg-dp-eps8", "fedavg-image-only", "fedavg-ehr-only"):
        assert base_of("base-tiny-base", arm) == str(tiny_base.resolve())
    assert base_of("base-random", "fedavg") == "random"
    # one synthetic federation per size, site count and seed, shared by the bases
    assert [p.name for p in (out / "data").iterdir()] == ["patients-40"]


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
    assert "(plots/study-quality-privacy-40.png)" in once
    assert (tmp_path / "plots" / "study-quality-sites.png").is_file()


def test_study_command_is_registered_and_rejects_bad_options(tmp_path):
    runner = CliRunner()

    help_text = runner.invoke(app, ["study", "quality", "--help"]).output
    bad = runner.invoke(
        app, ["study", "quality", "--size", "huge", "--out", str(tmp_path)]
    )

    assert "--write-docs" in help_text and "--seeds" in help_text
    assert "--patients" in help_text and "--bases" in help_text
    assert bad.exit_code == 2 and "smoke or full" in bad.output
    seeds = runner.invoke(
        app,
        [
            "study",
            "quality",
            "--size",
            "smoke",
            "--seeds",
            "3,1",
            "--out",
            str(tmp_path),
        ],
    )
    assert seeds.exit_code == 2 and "one per --patients size" in seeds.output
