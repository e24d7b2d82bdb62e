"""Sites without imaging: synth writes them, site check and the data path accept them
in runs that do not require images, and refuse runs that do, saying what to change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from wardround.client.cli import site_app
from wardround.client.preflight import preflight_site
from wardround.client.site_check import check_site, format_report
from wardround.common.config import RunConfig, TaskConfig
from wardround.common.errors import DataError
from wardround.common.text import get_tokenizer
from wardround.ops.config_file import load_run_config
from wardround.sitedata.dataset import load_site_data
from wardround.sitedata.imaging import task_for_site
from wardround.sitedata.site_config import SiteConfig
from wardround.synthetic.hospitals import synthesize_federation

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(site_app, name="site")
    return app


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """site-01 with images, site-02 without (same generator, same seed)."""
    out = tmp_path_factory.mktemp("mixed")
    synthesize_federation(out, 2, patients_per_site=24, seed=5, image_less_sites=1)
    return out


def _run_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_synth_writes_an_image_less_site_with_the_same_ehr(mixed, tmp_path):
    imaged = tmp_path / "imaged"
    synthesize_federation(imaged, 2, patients_per_site=24, seed=5)

    site = SiteConfig.from_toml(mixed / "site-02" / "site.toml")

    assert not site.has_imaging and site.data.dicom_dirs == ()
    assert not (mixed / "site-02" / "dicom").exists()
    assert "dicom-dirs" not in (mixed / "site-02" / "site.toml").read_text()
    assert SiteConfig.from_toml(mixed / "site-01" / "site.toml").has_imaging
    # only the images differ: the EHR table and notes are byte-identical
    assert (mixed / "site-02" / "ehr.parquet").read_bytes() == (
        imaged / "site-02" / "ehr.parquet"
    ).read_bytes()


def test_synth_refuses_more_image_less_sites_than_sites(tmp_path):
    from wardround.common.errors import ConfigError

    with pytest.raises(ConfigError, match="--image-less-sites 3 is not 0 to 2"):
        synthesize_federation(tmp_path, 2, patients_per_site=10, image_less_sites=3)


def test_site_check_passes_a_site_without_dicom_dirs(mixed):
    result = runner.invoke(
        _app(),
        ["site", "check", "--config", str(mixed / "site-02" / "site.toml"), "--json"],
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["can_train"] and report["dicom"]["folders"] == 0
    assert report["join"]["items"] > 10 and report["join"]["items_with_image"] == 0
    assert report["join"]["items_with_note"] > 0
    assert any("no imaging" in w for w in report["warnings"])


def test_site_check_blocks_a_run_that_requires_images_and_says_what_to_change(
    mixed, tmp_path
):
    run = _run_toml(tmp_path, "[task]\nrequire-image = true\n")

    result = runner.invoke(
        _app(),
        [
            "site",
            "check",
            "--config",
            str(mixed / "site-02" / "site.toml"),
            "--run-config",
            str(run),
        ],
    )

    assert result.exit_code == 3
    assert "has no imaging" in result.output
    assert "task.require-image = false" in result.output


@pytest.mark.parametrize(
    "run_toml",
    ["[task]\nrequire-image = false\n", '[model]\nmodalities = ["ehr", "note"]\n'],
)
def test_site_check_passes_runs_that_do_not_require_images(mixed, tmp_path, run_toml):
    config = load_run_config(_run_toml(tmp_path, run_toml))
    assert not config.requires_images

    report = check_site(
        mixed / "site-02" / "site.toml",
        config.task,
        image_size=32,
        images_required=config.requires_images,
    )

    assert report["can_train"], report["blocking"]
    # the terminal says there is no imaging, not a block of zero coverages
    text = format_report(report)
    assert "none: this site has no imaging" in text
    assert "ehr_coverage" not in text and "dicom_studies" not in text
    assert "items_with_note" in text


def test_an_unnamed_dicom_folder_beside_site_toml_is_pointed_out(mixed, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(mixed / "site-02", site)
    shutil.copytree(mixed / "site-01" / "dicom", site / "dicom")

    report = check_site(site / "site.toml", TaskConfig(), image_size=32)

    assert report["can_train"]
    assert any("data.dicom-dirs does not name it" in w for w in report["warnings"])


def test_image_less_items_have_no_image_and_every_ehr_study(mixed):
    site = SiteConfig.from_toml(mixed / "site-02" / "site.toml")
    task = task_for_site(site, TaskConfig(), images_required=False)

    data = load_site_data(
        site,
        task,
        image_size=32,
        max_note_tokens=32,
        tokenizer=get_tokenizer("byte"),
    )

    assert not task.require_image
    present = np.concatenate(
        [data.train.tensors["present"].numpy(), data.validation.tensors["present"]]
    )
    assert present[:, 0].sum() == 0 and present[:, 1].all()
    assert data.num_studies == data.num_without_image > 10
    assert not (mixed / "site-02" / ".wardround-cache" / "dicom-index.parquet").exists()


def test_the_data_path_refuses_a_task_that_requires_images(mixed):
    site = SiteConfig.from_toml(mixed / "site-02" / "site.toml")

    with pytest.raises(DataError, match="has no imaging") as err:
        load_site_data(
            site,
            TaskConfig(require_image=True),
            image_size=32,
            max_note_tokens=32,
            tokenizer=get_tokenizer("byte"),
        )
    assert "task.require-image = false" in (err.value.hint or "")


def test_preflight_refuses_a_run_that_requires_images_only(mixed):
    toml = mixed / "site-02" / "site.toml"

    with pytest.raises(DataError, match="site-02"):
        preflight_site(toml, TaskConfig(), images_required=True)
    assert not preflight_site(toml, TaskConfig(), images_required=False).has_imaging


def test_requires_images_follows_the_model_and_the_task():
    assert RunConfig().requires_images
    assert not RunConfig().with_overrides(task={"require_image": False}).requires_images
    assert (
        not RunConfig()
        .with_overrides(model={"modalities": ["ehr", "note"]})
        .requires_images
    )
