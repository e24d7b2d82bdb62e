"""A federation of a site with images and a site without: both train, in one run."""

from __future__ import annotations

import json
import shutil
import tomllib

import pytest
import tomli_w

from wardround.common.errors import DataError

pytestmark = pytest.mark.integration


@pytest.fixture
def mixed_sites(synthetic_sites, tmp_path):
    """The 2-site fixture, with site-02's imaging taken away (no dicom-dirs)."""
    sites = tmp_path / "sites"
    shutil.copytree(synthetic_sites, sites)
    toml = sites / "site-02" / "site.toml"
    doc = tomllib.loads(toml.read_text())
    del doc["data"]["dicom-dirs"]
    toml.write_text(tomli_w.dumps(doc))
    shutil.rmtree(sites / "site-02" / "dicom")
    shutil.rmtree(sites / "site-02" / ".wardround-cache", ignore_errors=True)
    return sites


def test_a_site_without_imaging_trains_beside_a_site_with_images(
    mixed_sites, tiny_config, tmp_path
):
    from wardround.client.site_check import check_site
    from wardround.simulations.runner import prepare_simulation, run_simulation_engine

    config = tiny_config.with_overrides(
        data={"sites_dir": str(mixed_sites)},
        task={"require_image": False},
        secure_aggregation={"enabled": False},
    )
    report = check_site(
        mixed_sites / "site-02" / "site.toml",
        config.task,
        image_size=32,
        images_required=config.requires_images,
    )
    assert report["can_train"], report["blocking"]
    config, n_sites = prepare_simulation(
        config, out_dir=tmp_path / "run", sites=None, rounds=1
    )

    run_simulation_engine(config, n_sites)

    lines = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["round"] == 1
    assert sorted(t["site"] for t in last["train"]) == ["site-01", "site-02"]
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(summary["final"]["sites"]) == {"site-01", "site-02"}


def test_a_run_that_requires_images_is_refused_before_it_starts(
    mixed_sites, tiny_config, tmp_path
):
    from wardround.simulations.runner import prepare_simulation

    config = tiny_config.with_overrides(
        data={"sites_dir": str(mixed_sites)}, secure_aggregation={"enabled": False}
    )

    with pytest.raises(DataError, match="site-02.*has no imaging"):
        prepare_simulation(config, out_dir=tmp_path / "run", sites=None, rounds=1)
