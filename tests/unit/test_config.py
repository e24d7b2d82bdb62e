import pytest

from wardround.common.config import Fusion, RunConfig, Strategy
from wardround.common.errors import ConfigError


def test_defaults_round_trip_through_flower_run_config():
    config = RunConfig()
    flat = config.to_flower()
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert RunConfig.from_flower(flat) == config


def test_toml_file_with_dashed_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[federation]\nstrategy = "fedprox"\nproximal-mu = 0.1\nrounds = 2\n'
        '[model]\nfusion = "cross-attention"\nmodalities = ["image", "note"]\n'
    )
    config = RunConfig.from_toml(path)
    assert config.federation.strategy is Strategy.FEDPROX
    assert config.federation.proximal_mu == 0.1
    assert config.model.fusion is Fusion.CROSS_ATTENTION
    assert [m.value for m in config.model.modalities] == ["image", "note"]


def test_every_problem_is_reported_at_once_with_known_keys():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(
            {
                "federation": {"strategy": "fedsgd", "roundz": 3},
                "train": {"batch-size": 0},
            }
        )
    text = str(info.value)
    assert "3 problem(s)" in text
    assert "federation.strategy" in text and "fedsgd" in text
    assert "roundz: unknown key" in text and "rounds" in text
    assert "train.batch-size" in text


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown key"):
        RunConfig.from_mapping({"privacy-budget": {}})


def test_fedprox_needs_positive_mu():
    with pytest.raises(ConfigError, match="proximal-mu"):
        RunConfig.from_mapping({"federation": {"strategy": "fedprox"}})


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(bad)


def test_ehr_width_counts_values_flags_and_onehots():
    config = RunConfig()
    assert config.task.ehr_width == 2 * 7 + (2 + 1)


def test_device_is_validated():
    import torch

    from wardround.client.runtime import resolve_device

    with pytest.raises(ConfigError, match="train.device"):
        RunConfig.from_mapping({"train": {"device": "gpu"}})
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA device"):
            resolve_device("cuda:0")


def test_secure_aggregation_settings_are_checked_together():
    from wardround.common.errors import ConfigError

    with pytest.raises(ConfigError, match="delta-clip-norm > 0"):
        RunConfig().with_overrides(federation={"delta_clip_norm": 0.0})
    assert RunConfig().federation.min_sites == 3  # the default is valid
    for too_few in (1, 2):
        with pytest.raises(ConfigError, match="min-sites >= 3"):
            RunConfig().with_overrides(federation={"min_sites": too_few})
    one_site = RunConfig().with_overrides(
        federation={"min_sites": 1}, secure_aggregation={"enabled": False}
    )
    assert one_site.federation.min_sites == 1
    with pytest.raises(ConfigError, match="num-shares"):
        RunConfig().with_overrides(secure_aggregation={"num_shares": 2.5})
