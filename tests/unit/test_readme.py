"""The README's config examples are valid: they are what users copy."""

import re
from pathlib import Path

from wardround.common.config import RunConfig
from wardround.ops.config_file import load_run_config
from wardround.sitedata.site_config import SiteConfig

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
TOML_BLOCKS = re.findall(r"```toml\n(.*?)```", README, flags=re.S)


def test_readme_run_config_parses_and_matches_the_defaults(tmp_path):
    block = next(b for b in TOML_BLOCKS if "[federation]" in b)
    path = tmp_path / "run.toml"
    path.write_text(block)
    config = load_run_config(path)
    defaults = RunConfig()
    for section in (
        "federation",
        "train",
        "model",
        "data",
        "privacy",
        "secure_aggregation",
        "output",
    ):
        assert getattr(config, section) == getattr(defaults, section), section


def test_readme_site_toml_parses(tmp_path):
    block = next(b for b in TOML_BLOCKS if "[ehr.features]" in b)
    path = tmp_path / "site.toml"
    path.write_text(block)
    site = SiteConfig.from_toml(path)
    assert site.ehr.study_uid == "accession_study_uid"
