import numpy as np
import pytest
import torch

from wardround.common import wire
from wardround.common.adapter import (
    adapter_state,
    from_record,
    load_adapter_state,
    to_record,
)
from wardround.common.errors import ConfigError, FederationError
from wardround.common.packing import AdapterLayout
from wardround.models import build_base_model, build_model
from wardround.models.adapter_files import save_peft_adapter
from wardround.models.fusion import lora_targets


def _batch(config, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, length = config.model.image_size, config.model.max_note_tokens
    return {
        "image": torch.rand(n, 1, size, size, generator=g),
        "ehr": torch.randn(n, config.task.ehr_width, generator=g),
        "note_ids": torch.randint(3, 200, (n, length), generator=g),
        "note_mask": torch.ones(n, length, dtype=torch.long),
        "present": torch.ones(n, 3),
    }


@pytest.mark.parametrize("fusion", ["concat", "gated", "cross-attention"])
def test_every_fusion_gives_one_logit_per_label(tiny_config, fusion):
    config = tiny_config.with_overrides(model={"fusion": fusion})
    model = build_model(config).model
    assert model(**_batch(config)).shape == (3, len(config.task.labels))


def test_build_is_deterministic_and_fingerprint_tracks_the_base(tiny_config):
    a, b = build_model(tiny_config), build_model(tiny_config)
    assert a.base_fingerprint == b.base_fingerprint
    sa, sb = adapter_state(a.model), adapter_state(b.model)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    other = build_model(tiny_config.with_overrides(model={"init_seed": 1}))
    assert other.base_fingerprint != a.base_fingerprint


def test_only_lora_and_declared_modules_train(tiny_config):
    model = build_model(tiny_config).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    allowed = (
        "lora_A",
        "lora_B",
        "vision_proj",
        "text_proj",
        "ehr_encoder",
        "fusion",
        "head",
        "wide",
    )
    assert trainable and all(any(a in n for a in allowed) for n in trainable)
    # the encoders' own weights stay frozen
    assert not any(
        ("encoder" in n and "lora_" not in n and "ehr_encoder" not in n)
        for n in trainable
    )
    assert all(
        t.rsplit(".", 1)[-1] in {"q_proj", "v_proj", "query", "value"}
        for t in lora_targets(model.get_base_model())
    )


def test_absent_modality_does_not_change_the_prediction(tiny_config):
    model = build_model(tiny_config).model.eval()
    batch = _batch(tiny_config)
    batch["present"][:, 0] = 0.0
    other = dict(batch, image=torch.rand_like(batch["image"]))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), model(**other))


def test_adapter_round_trip_through_peft_from_pretrained(tiny_config, tmp_path):
    from peft import PeftModel

    built = build_model(tiny_config)
    state = adapter_state(built.model)
    rng = np.random.default_rng(0)
    changed = {
        k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in state.items()
    }
    save_peft_adapter(built.model, changed, tmp_path / "adapter")

    base, fingerprint = build_base_model(tiny_config)
    assert fingerprint == built.base_fingerprint
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    reloaded = adapter_state(loaded)
    assert set(reloaded) == set(changed)
    for k in changed:
        np.testing.assert_allclose(reloaded[k], changed[k], rtol=0, atol=0)
    batch = _batch(tiny_config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch), built.model.eval()(**batch))


def test_adapter_travels_through_a_flower_record_without_change(tiny_config):
    state = adapter_state(build_model(tiny_config).model)
    record = to_record(state)
    # wire version 2: one packed array, however many tensors the adapter has
    assert len(state) > 1 and list(record.keys()) == [wire.PACKED_ADAPTER]
    back = from_record(record, AdapterLayout.of_state(state))
    assert list(back) == list(state)
    assert all(
        np.array_equal(back[k], state[k]) and back[k].dtype == np.float32 for k in state
    )


def test_a_record_of_another_wire_version_or_layout_is_refused(tiny_config):
    from flwr.app import Array, ArrayRecord

    state = adapter_state(build_model(tiny_config).model)
    layout = AdapterLayout.of_state(state)
    per_tensor = ArrayRecord({k: Array(v) for k, v in state.items()})  # version 1
    with pytest.raises(FederationError, match="wire version 2 sends one"):
        from_record(per_tensor, layout)
    smaller = AdapterLayout(layout.tensors[1:])
    with pytest.raises(FederationError, match="needs a vector of"):
        from_record(to_record(state), smaller)


def test_loading_a_foreign_adapter_is_refused(tiny_config):
    model = build_model(tiny_config).model
    state = adapter_state(model)
    extra = dict(state, **{"base_model.model.stolen.weight": np.zeros(3, np.float32)})
    with pytest.raises(FederationError, match="unexpected"):
        load_adapter_state(model, extra)
    key = next(iter(state))
    wrong = dict(state, **{key: np.zeros((1, 1), np.float32)})
    with pytest.raises(FederationError, match="shape"):
        load_adapter_state(model, wrong)


def test_from_pretrained_path_loads_a_locally_saved_encoder(tiny_config, tmp_path):
    from transformers import AutoModel

    from wardround.models.fusion import tiny_vision_config

    torch.manual_seed(3)
    AutoModel.from_config(tiny_vision_config(32)).save_pretrained(tmp_path / "vit")
    config = tiny_config.with_overrides(model={"vision": str(tmp_path / "vit")})
    built = build_model(config)
    saved = AutoModel.from_pretrained(tmp_path / "vit")
    torch.testing.assert_close(
        built.model.get_base_model().vision_encoder.embeddings.patch_embeddings.projection.weight,
        saved.embeddings.patch_embeddings.projection.weight,
    )
    assert built.base_fingerprint != build_model(tiny_config).base_fingerprint


def test_unloadable_encoder_is_a_config_error(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="cannot load encoder"):
        build_model(
            tiny_config.with_overrides(model={"vision": str(tmp_path / "missing")})
        )


def test_unknown_family_lists_known_ones(tiny_config):
    with pytest.raises(ConfigError, match="fusion"):
        build_model(tiny_config.with_overrides(model={"family": "nope"}))


def test_slices_as_channels_reach_the_vision_encoder(tiny_config):
    config = tiny_config.with_overrides(
        task={"slice_mode": "channels", "image_channels": 3}
    )
    model = build_model(config).model
    assert model.get_base_model().vision_encoder.config.num_channels == 3
    batch = _batch(config)
    batch["image"] = torch.rand(3, 3, 32, 32)
    assert model(**batch).shape == (3, len(config.task.labels))


def test_the_trainers_positional_inputs_follow_the_fusion_models_forward():
    """The objective passes INPUT_KEYS by position (for Opacus's ew): same order,
    for the fusion model and the study's classical reference model alike."""
    import inspect

    from wardround.client.objectives import INPUT_KEYS
    from wardround.models.fusion import FusionModel
    from wardround.simulations.study.classical import LinearReference

    for model in (FusionModel, LinearReference):
        parameters = list(inspect.signature(model.forward).parameters)
        assert parameters[1:] == list(INPUT_KEYS), model
