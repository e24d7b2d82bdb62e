"""site.toml and coordinator.toml are read by one from_toml (wardround.ops.config_file)."""

import pytest

from wardround.common.errors import ConfigError
from wardround.ops.config_file import TomlFileConfig
from wardround.server.coordinator_config import CoordinatorConfig
from wardround.sitedata.site_config import SiteConfig

# the one table coordinator.toml must have
MINIMAL = {
    SiteConfig: "",
    CoordinatorConfig: '[tls]\nca-certificate = "ca.pem"\ncertificate = "c.pem"\n'
    'private-key = "c.key"\n',
}


@pytest.mark.parametrize("config", [SiteConfig, CoordinatorConfig])
def test_both_files_share_one_reader(config):
    assert issubclass(config, TomlFileConfig)
    assert config.from_toml.__func__ is TomlFileConfig.from_toml.__func__


@pytest.mark.parametrize(
    ("config", "section", "hint"),
    [
        (SiteConfig, "site", "wardround synth"),
        (CoordinatorConfig, "coordinator", "deploy/README.md"),
    ],
)
def test_every_problem_is_listed_with_the_file_s_own_hint(
    tmp_path, config, section, hint
):
    path = tmp_path / "some.toml"
    path.write_text(f"{MINIMAL[config]}[{section}]\nbogus-one = 1\nbogus-two = 2\n")
    with pytest.raises(ConfigError) as caught:
        config.from_toml(path)
    assert f"{path} has 2 problem(s)" in caught.value.message
    assert "bogus-one" in caught.value.message and "bogus-two" in caught.value.message
    assert hint in caught.value.hint


@pytest.mark.parametrize("config", [SiteConfig, CoordinatorConfig])
def test_relative_paths_resolve_against_the_file_s_folder(tmp_path, config):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "x.toml").write_text(MINIMAL[config])
    loaded = config.from_toml(folder / "x.toml")
    assert loaded.base_dir == folder.resolve()
    assert loaded.resolve("state") == folder.resolve() / "state"
