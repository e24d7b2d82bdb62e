"""The study on a folder of real site folders (--sites-dir): image-less sites (EHR and
notes only) run every arm their data supports, the classical reference included, and
the image-only arm is skipped with the reason; the sites' own folders are not written."""

import json
import tomllib

import pytest
import tomli_w
from typer.testing import CliRunner

from wardround.cli import app
from wardround.simulations.study.plan import THIN_CLASS, StudySettings, StudySize
from wardround.simulations.study.runner import run_study
from wardround.synthetic.hospitals import synthesize_federation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sites_dir_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospitals")
    synthesize_federation(
        root / "sites", 3, patients_per_site=40, seed=5, image_less_sites=3
    )
    before = sorted(p.relative_to(root) for p in (root / "sites").rglob("*"))
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, root / "sites")
    out = tmp_path_factory.mktemp("study")
    result = run_study(settings, out, command="test")
    return root, before, settings, out, result


def test_every_supported_arm_has_a_row_and_the_image_arm_says_why_not(sites_dir_study):
    root, before, settings, out, result = sites_dir_study
    data = json.loads((out / "study.json").read_text())

    assert result.failed == []
    (cell,) = data["summary"]
    assert cell == "sites3-random"
    arms = data["summary"][cell]
    expected = {a.name for a in settings.arms} - {"fedavg-image-only"}
    assert set(arms) == expected
    assert all(entry["seeds"] == 1 for entry in arms.values())
    for name in ("classical-pooled", "classical-local", "classical-fedavg"):
        assert arms[name]["auroc"]["mean"] > 0.5, name
    assert data["settings"]["skipped_arms"] == {
        "fedavg-image-only": "no site has images"
    }
    assert data["settings"]["unscored_sites"] == {}  # a skipped arm is not scored
    report = (out / "report.md").read_text()
    assert "own data" in report and "fedavg-image-only: no site has images" in report
    assert "never a deployment" in report
    assert "| classical, pooled |" in report and "| FedAvg, note only |" in report
    # no site has images: no arm builds or sends an image encoder
    saved = out / "arms" / "own-data" / "sites-3" / "base-random" / "seed-0"
    fedavg = tomllib.loads((saved / "fedavg" / "run" / "run-config.toml").read_text())
    assert fedavg["model"]["modalities"] == ["ehr", "note"]
    # the sites' folders are read, never written (cache and ledger under --out)
    assert sorted(p.relative_to(root) for p in (root / "sites").rglob("*")) == before


def test_a_mixed_federation_scores_the_image_arm_only_where_there_are_images(
    tmp_path,
):
    from wardround.simulations.study.report_setup import _arm_notes
    from wardround.simulations.study.study_data import inspect_sites

    synthesize_federation(
        tmp_path / "sites", 3, patients_per_site=20, seed=7, image_less_sites=1
    )
    # site-02 does not record one finding and one lab
    toml = tmp_path / "sites" / "site-02" / "site.toml"
    doc = tomllib.loads(toml.read_text())
    for table, name in (("labels", "pneumonia"), ("features", "crp")):
        doc["ehr"].get(table, {}).pop(name, None)
    doc["ehr"]["not-recorded"] = ["pneumonia", "crp"]
    toml.write_text(tomli_w.dumps(doc))
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, tmp_path / "sites")

    read = inspect_sites(settings, tmp_path / "out")

    assert read.missing == {} and read.skipped() == {}
    ((site, gaps),) = read.site_gaps.items()
    assert gaps == ("image",)
    image_only = next(a for a in read.arms if a.name == "fedavg-image-only")
    assert read.unscored_sites(image_only) == {
        site: f"{site} has no images in its validation split"
    }
    # each site's answer precision, for comparing its AUROC with its local model
    assert read.site_decimals == {s: 3 for s in ("site-01", "site-02", "site-03")}
    assert read.site_not_recorded == {"site-02": ("pneumonia", "crp")}
    # 4 validation patients a site: every site has findings with few examples of
    # a class; a not-recorded finding is reported as that, not as thin
    assert set(read.site_thin_labels) == {"site-01", "site-02", "site-03"}
    assert "pneumonia" not in read.site_thin_labels["site-02"]
    for site, labels in read.site_thin_labels.items():
        for label, (positive, negative) in labels.items():
            assert min(positive, negative) < THIN_CLASS, (site, label)
            assert 0 < positive + negative <= 20, (site, label)
    notes = "\n".join(_arm_notes(read.describe()))
    assert "Not recorded at a site" in notes and "site-02: pneumonia, crp" in notes
    assert "Few validation examples of a class" in notes


def test_a_site_that_left_the_folder_leaves_the_staged_federation(tmp_path):
    import shutil

    from wardround.simulations.study.study_data import stage_sites

    synthesize_federation(
        tmp_path / "sites", 3, patients_per_site=12, seed=7, image_less_sites=3
    )
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, tmp_path / "sites")
    first = stage_sites(settings, tmp_path / "out")
    shutil.rmtree(tmp_path / "sites" / "site-03")
    settings = StudySettings.for_sites_dir(StudySize.SMOKE, tmp_path / "sites")

    second = stage_sites(settings, tmp_path / "out")

    staged = tmp_path / "out" / "data" / "sites-dir"
    assert len(first) == 3 and len(second) == 2
    assert sorted(staged.glob("*/site.toml")) == sorted(second)
    assert (staged / "site-03").is_dir()  # its cache and ledger are kept


def test_the_command_refuses_synthetic_sizes_with_a_sites_dir(tmp_path):
    runner = CliRunner()

    bad = runner.invoke(
        app,
        [
            "study",
            "quality",
            "--sites-dir",
            str(tmp_path),
            "--patients",
            "200",
            "--out",
            str(tmp_path / "out"),
        ],
    )

    assert bad.exit_code == 2 and "--sites-dir runs on the sites it holds" in bad.output
