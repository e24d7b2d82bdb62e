import pytest

from wardround.common.config import Fusion, GradSampleMode, RunConfig, Strategy
from wardround.common.errors import ConfigError
from wardround.ops.config_file import load_run_config


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
    config = load_run_config(path)
    assert config.federation.strategy is Strategy.FEDPROX
    assert config.federation.proximal_mu == 0.1
    assert config.model.fusion is Fusion.CROSS_ATTENTION
    assert [m.value for m in config.model.modalities] == ["image", "note"]


def test_every_problem_is_reported_at_once_with_known_keys():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(
            {
                "federation": {"strategy": "fedsgd", "roundz": 3},
                "train": {"batch-size": -1},
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
        load_run_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(bad)


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


def test_half_precision_transport_is_for_plain_rounds_only():
    from wardround.common.config import TransportDtype
    from wardround.common.errors import ConfigError

    assert RunConfig().federation.transport_dtype is TransportDtype.FLOAT32
    with pytest.raises(ConfigError, match="applies to plain rounds"):
        RunConfig().with_overrides(federation={"transport_dtype": "float16"})
    plain = RunConfig().with_overrides(
        federation={"transport_dtype": "bfloat16"},
        secure_aggregation={"enabled": False},
    )
    assert plain.federation.transport_dtype is TransportDtype.BFLOAT16
    with pytest.raises(ConfigError, match="needs federation.delta-clip-norm > 0"):
        RunConfig().with_overrides(
            federation={"transport_dtype": "float16", "delta_clip_norm": 0.0},
            secure_aggregation={"enabled": False},
        )
    with pytest.raises(ConfigError, match="transport"):
        RunConfig().with_overrides(
            federation={"transport_dtype": "int8"},
            secure_aggregation={"enabled": False},
        )


# Every size, count, time and privacy setting has an upper bound: a hostile or
# mistaken run config cannot ask a site for a 10^9-wide layer or a week per step.
OUT_OF_BOUNDS = [
    ("federation", "proximal-mu", 100.5),
    ("federation", "rounds", 10_001),
    ("federation", "min-sites", 10_001),
    ("federation", "round-timeout-s", 604_801.0),
    ("federation", "delta-clip-norm", 10_001.0),
    ("federation", "join-timeout-s", 86_401.0),
    ("federation", "expected-sites", 10_001),
    ("train", "local-epochs", 1001),
    ("train", "max-steps", 1_000_001),
    ("train", "batch-size", 65_537),
    ("train", "learning-rate", 10.5),
    ("train", "weight-decay", 10.5),
    ("train", "eval-batch-size", 65_537),
    ("train", "eval-generations", 10_001),
    ("train", "torch-threads", 1025),
    ("model", "image-size", 1025),
    ("model", "max-note-tokens", 4097),
    ("model", "hidden-size", 16_385),
    ("model", "lora-rank", 257),
    ("model", "lora-alpha", 4097.0),
    ("model", "max-seq-tokens", 32_769),
    ("model", "max-new-tokens", 4097),
    ("task", "labels", [f"l{i}" for i in range(1025)]),
    ("task", "numeric", {f"f{i}": {"mean": 0.0, "std": 1.0} for i in range(1025)}),
    ("task", "categorical", {f"c{i}": ["a"] for i in range(1025)}),
    ("task", "image-channels", 17),
    ("data", "synthesize-sites", 257),
    ("data", "patients-per-site", 1_000_001),
    ("privacy", "target-epsilon", 1000.5),
    ("privacy", "max-grad-norm", 1000.5),
    ("secure-aggregation", "num-shares", 10_001.0),
    ("secure-aggregation", "reconstruction-threshold", 10_001.0),
    ("secure-aggregation", "stage-timeout-s", 86_401.0),
    ("output", "checkpoint-every", 10_001),
]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    OUT_OF_BOUNDS,
    ids=[f"{section}.{key}" for section, key, _ in OUT_OF_BOUNDS],
)
def test_an_out_of_bound_run_setting_is_a_config_error_naming_it(section, key, value):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({section: {key: value}})
    assert f"{section}.{key}" in info.value.message
    assert "1 problem(s)" in info.value.message


def test_a_categorical_vocabulary_is_bounded():
    vocabulary = [f"v{i}" for i in range(4097)]
    with pytest.raises(ConfigError, match="categorical.sex: at most 4096 values"):
        RunConfig.from_mapping({"task": {"categorical": {"sex": vocabulary}}})


def test_the_bounds_leave_room_for_real_gpu_runs():
    config = RunConfig.from_mapping(
        {
            "model": {"hidden-size": 16_384, "image-size": 1024, "lora-rank": 256},
            "train": {
                "batch-size": 4096,
                "eval-batch-size": 65_536,
                "torch-threads": 1024,
                "max-steps": 1_000_000,
            },
            "federation": {"strategy": "fedprox", "proximal-mu": 100.0},
        }
    )
    assert config.model.hidden_size == 16_384
    assert config.train.max_steps == 1_000_000


SITE_OUT_OF_BOUNDS = [
    ("data", "dicom-dirs", [f"d{i}" for i in range(1025)]),
    ("privacy", "max-epsilon", 1000.5),
    ("privacy", "budget-epsilon", 1_000_001.0),
    ("privacy", "min-noise-multiplier", 1000.5),
    ("deployment", "runtime-port", 65_536),
    ("deployment", "refusal-grace-s", 86_401.0),
    ("deployment", "poll-interval-s", 3.5),
    ("ehr", "features", {f"f{i}": f"c{i}" for i in range(1025)}),
    ("ehr", "labels", {f"l{i}": f"c{i}" for i in range(1025)}),
]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    SITE_OUT_OF_BOUNDS,
    ids=[f"{section}.{key}" for section, key, _ in SITE_OUT_OF_BOUNDS],
)
def test_an_out_of_bound_site_setting_is_a_config_error_naming_it(
    tmp_path, section, key, value
):
    import tomli_w

    from wardround.sitedata.site_config import SiteConfig

    path = tmp_path / "site.toml"
    table = {section: {key: value}}
    if key == "budget-epsilon":
        table[section]["max-epsilon"] = 10.0
    path.write_text(tomli_w.dumps(table))
    with pytest.raises(ConfigError) as info:
        SiteConfig.from_toml(path)
    assert f"{section}.{key}" in info.value.message


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_ghost_clipping_is_refused_on_a_base_that_may_be_bfloat16(dtype):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(
            {
                "model": {"family": "vlm", "tiny-arch": "llava", "dtype": dtype},
                "task": {"kind": "vqa"},
                "privacy": {"grad-sample-mode": "ghost"},
            }
        )
    assert "needs model.dtype = 'float32'" in str(info.value)
    plain = RunConfig.from_mapping(
        {
            "model": {"family": "vlm", "tiny-arch": "llava", "dtype": dtype},
            "task": {"kind": "vqa"},
            "privacy": {"grad-sample-mode": "hooks"},
        }
    )
    assert plain.privacy.grad_sample_mode is GradSampleMode.HOOKS


def test_ghost_clipping_is_refused_with_cross_attention_fusion():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(
            {
                "model": {"fusion": "cross-attention"},
                "privacy": {"grad-sample-mode": "ghost"},
            }
        )
    assert "cannot measure model.fusion 'cross-attention'" in str(info.value)
    RunConfig.from_mapping(
        {"model": {"fusion": "gated"}, "privacy": {"grad-sample-mode": "ghost"}}
    )
    RunConfig.from_mapping(
        {
            "model": {"fusion": "cross-attention"},
            "privacy": {"enabled": False, "grad-sample-mode": "ghost"},
        }
    )


def test_every_grad_sample_mode_is_accepted():
    # client/dp.py runs each of them (ghost through per-example losses)
    for mode in GradSampleMode:
        config = RunConfig.from_mapping({"privacy": {"grad-sample-mode": mode.value}})
        assert config.privacy.grad_sample_mode is mode


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_the_other_grad_sample_modes_are_accepted(mode):
    config = RunConfig.from_mapping({"privacy": {"grad-sample-mode": mode}})
    assert config.privacy.grad_sample_mode.value == mode


def test_a_partial_units_or_ranges_table_keeps_the_other_features_defaults():
    config = RunConfig.from_mapping(
        {"task": {"ranges": {"age": [0.0, 110.0]}, "units": {"crp": "mg/dL"}}}
    )
    task = config.task
    assert task.ranges["age"] == (0.0, 110.0)
    assert task.ranges["temperature"] == (25.0, 45.0)  # still caught out of range
    assert task.units["crp"] == "mg/dL" and task.units["temperature"] == "degC"
    own = RunConfig.from_mapping(
        {"task": {"numeric": {"lactate": {"mean": 1.5, "std": 1.0}}}}
    ).task
    assert own.units == {} and own.ranges == {}  # defaults only for its features


@pytest.mark.parametrize(
    ("task", "says"),
    [
        ({"labels": ["effusion", "pneumonia", "effusion"]}, "lists 'effusion' twice"),
        ({"labels": [""]}, "a label name is empty"),
        ({"units": {"temprature": "degC"}}, "names 'temprature', not a numeric"),
        ({"ranges": {"lactate": [0.0, 30.0]}}, "names 'lactate', not a numeric"),
        ({"categorical": {"age": ["young", "old"]}}, "both numeric and categorical"),
        ({"labels": ["age", "effusion"]}, "'age' is both a label and an input"),
        ({"categorical": {"sex": ["F", "M", "F"]}}, "categorical.sex lists 'F' twice"),
        ({"categorical": {"sex": []}}, "categorical.sex: name at least one value"),
        ({"numeric": {"age": {"mean": float("nan"), "std": 1.0}}}, "must be finite"),
    ],
)
def test_a_task_that_cannot_mean_what_it_says_is_refused(task, says):
    with pytest.raises(ConfigError, match=says):
        RunConfig.from_mapping({"task": task})


def test_reconstruction_threshold_must_be_below_the_share_count():
    with pytest.raises(ConfigError, match=r"must be below num-shares \(3\)"):
        RunConfig().with_overrides(
            secure_aggregation={"num_shares": 3, "reconstruction_threshold": 3}
        )


@pytest.mark.parametrize(
    ("section", "key"),
    [("federation", "seed"), ("data", "synth_seed"), ("model", "init_seed")],
)
def test_seeds_are_non_negative_64_bit(section, key):
    for bad in (-1, 2**64):
        with pytest.raises(ConfigError, match=key.replace("_", "-")):
            RunConfig().with_overrides(**{section: {key: bad}})


@pytest.mark.parametrize(
    ("section", "key"),
    [("federation", "rounds"), ("privacy", "target-epsilon"), ("train", "batch-size")],
)
def test_true_or_false_is_not_read_as_a_number(section, key):
    with pytest.raises(ConfigError, match=f"{key} is a number; true is not one"):
        RunConfig.from_mapping({section: {key: True}})


def test_site_toml_problems_name_the_key_not_pydantics_union_members(tmp_path):
    from wardround.sitedata.site_config import SiteConfig

    toml = tmp_path / "site.toml"
    toml.write_text(
        'sitee = 1\n[site]\nname = "a"\n[ehr.features]\n'
        'temperature = { column = "t", range = [45, 25] }\n'
        '[ehr.labels]\npneumonia = { column = "p", positive = [1] }\n'
    )
    with pytest.raises(ConfigError) as info:
        SiteConfig.from_toml(toml)
    text = str(info.value)
    assert "3 problem(s)" in text
    assert "ehr.features.temperature: range must be [low, high]" in text
    assert (
        'ehr.labels.pneumonia.positive.0: Input should be a valid string (got 1); write it in quotes: "1"'
        in text
    )
    assert "function-after" not in text and "Value error" not in text
    assert ".str:" not in text
    assert "sitee: unknown key; known keys here: answers," in text
    assert "base-dir" not in text  # the reader sets it; a file does not
