"""The [model] section is one config class per family, and one registry names each
family's config class, builder, objective and data loader."""

import re
from pathlib import Path

import pytest

from wardround.common.config import (
    FAMILY_CONFIGS,
    FusionModelConfig,
    RunConfig,
    TrainableScope,
    VlmModelConfig,
)
from wardround.common.errors import ConfigError
from wardround.models import FAMILIES, family_of, get_family
from wardround.models.lora import lora_config
from wardround.models.registry import _resolve
from wardround.ops.config_file import load_run_config

ROOT = Path(__file__).resolve().parents[2]
VLM = {"family": "vlm", "tiny-arch": "llava"}


def _problems(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_mapping(raw)
    return str(caught.value)


def test_a_model_section_without_family_is_the_fusion_family():
    config = RunConfig.from_mapping({"model": {"hidden-size": 32}})

    assert type(config.model) is FusionModelConfig
    assert config.model.hidden_size == 32
    assert type(RunConfig().model) is FusionModelConfig


def test_each_family_holds_only_its_own_keys():
    fusion, vlm = set(FusionModelConfig.model_fields), set(VlmModelConfig.model_fields)
    shared = fusion & vlm

    assert {"path", "tiny_arch", "lora_towers", "max_new_tokens"} <= vlm - fusion
    assert {"vision", "modalities", "base", "trainable", "wide"} <= fusion - vlm
    assert shared == {
        "family",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_variant",
        "init_seed",
        "image_size",
    }


def test_a_key_of_the_other_family_says_which_family_takes_it():
    text = _problems({"model": {"path": "/models/llava-med"}})
    assert "model.path: a key of model.family 'vlm'" in text
    assert "this model's family is 'fusion'" in text

    text = _problems({"model": {**VLM, "modalities": ["ehr"]}, "task": {"kind": "vqa"}})
    assert "model.modalities: a key of model.family 'fusion'" in text
    assert "this model's family is 'vlm'" in text


def test_an_unknown_key_lists_the_family_s_own_keys():
    text = _problems({"model": {**VLM, "colour": 1}, "task": {"kind": "vqa"}})

    assert "model.colour: unknown key; known keys here: dtype, family," in text
    assert "vision" not in text.split("known keys here:")[1]


def test_an_unknown_family_lists_the_known_ones():
    text = _problems({"model": {"family": "diffusion"}})

    assert "model: unknown model family; model.family is one of: fusion, vlm" in text


def test_an_error_inside_a_family_is_located_without_the_union_tag():
    text = _problems({"model": {"fusion": "sum", "hidden-size": 2}})

    assert "  - model.fusion: Input should be 'concat'" in text
    assert "  - model.hidden-size: Input should be greater than or equal to 8" in text


def test_every_run_config_file_and_doc_example_parses(tmp_path):
    blocks = [p.read_text() for p in sorted((ROOT / "simulations").glob("*.toml"))]
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        blocks += [
            b
            for b in re.findall(r"```toml\n(.*?)```", doc.read_text(), flags=re.S)
            if "[model]" in b
        ]
    assert len(blocks) >= 3  # the simulation file, the README's fusion and vlm blocks
    families = set()
    for n, block in enumerate(blocks):
        path = tmp_path / f"run-{n}.toml"
        path.write_text(block)
        families.add(load_run_config(path).model.family)
    assert families == {"fusion", "vlm"}


def test_a_config_survives_flower_s_flat_run_config_per_family():
    for config in (
        RunConfig(model={"hidden_size": 32}),
        RunConfig(model=VLM, task={"kind": "report"}),
    ):
        assert RunConfig.from_flower(config.to_flower()) == config


def test_switching_family_by_override_keeps_only_the_shared_keys():
    fusion = RunConfig().with_overrides(model={"lora_rank": 4, "hidden_size": 32})

    vlm = fusion.with_overrides(model={**VLM}, task={"kind": "vqa"})

    assert type(vlm.model) is VlmModelConfig
    assert vlm.model.lora_rank == 4


def test_families_answer_the_questions_the_run_asks():
    fusion = RunConfig(model={"modalities": ["ehr", "note"]})
    vlm = RunConfig(model=VLM, task={"kind": "vqa"})

    assert not fusion.requires_images and RunConfig().requires_images
    assert vlm.requires_images
    assert vlm.model.generative and not fusion.model.generative
    assert fusion.model.dp_recipe and not vlm.model.dp_recipe
    assert vlm.model.trainable_scope is TrainableScope.AUTO
    assert (
        RunConfig(model={"trainable": "all"}).model.trainable_scope
        is TrainableScope.ALL
    )


def test_the_registry_has_a_family_for_every_config_class():
    assert set(FAMILIES) == set(FAMILY_CONFIGS)
    for name, family in FAMILIES.items():
        assert family.name == name
        assert family.config is FAMILY_CONFIGS[name]


def test_every_registered_part_resolves_to_a_callable():
    for family in FAMILIES.values():
        for reference in (
            family.builder,
            family.base_builder,
            family.objective,
            family.data_loader,
        ):
            assert callable(_resolve(reference)), reference


def test_family_of_picks_the_config_s_family():
    vlm = RunConfig(model=VLM, task={"kind": "vqa"})

    assert family_of(RunConfig()) is FAMILIES["fusion"]
    assert family_of(vlm) is FAMILIES["vlm"]
    with pytest.raises(ConfigError, match="fusion, vlm"):
        get_family("diffusion")


def test_lora_settings_come_from_the_model_config():
    model = RunConfig(model={"lora_rank": 4, "lora_alpha": 8.0}).model

    lora = lora_config(model, ["q_proj"], modules_to_save=["head"])

    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 8.0, 0.0)
    assert set(lora.target_modules) == {"q_proj"}
    assert lora.modules_to_save == ["head"]


def test_family_code_gets_its_own_config_or_a_config_error():
    vlm = RunConfig(model=VLM, task={"kind": "vqa"})

    assert VlmModelConfig.of(vlm) is vlm.model
    assert FusionModelConfig.of(RunConfig()).hidden_size == 64
    with pytest.raises(ConfigError, match="needs model.family 'fusion'.*is 'vlm'"):
        FusionModelConfig.of(vlm)


def test_the_fusion_family_s_objective_is_built_from_the_run_config():
    from wardround.client.objectives import FusionObjective

    config = RunConfig(train={"modality_dropout": 0.3})

    objective = family_of(config).make_objective(config, None)

    assert isinstance(objective, FusionObjective)
    assert objective.modality_dropout == 0.3
