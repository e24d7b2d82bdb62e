"""The frozen encoders' embeddings, cached per run: the same model, fewer passes.

Under the DP recipe only the fusion module, the head and the wide term train, so
training may read each study's pooled embeddings from a cache. These tests check
that it trains and evaluates exactly as the encoders run every step would, that the
encoders then run once per study, and that the cache never serves stale or wrong
embeddings.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from wardround.client.dp import DpTraining
from wardround.client.frozen_features import cacheable_fusion, with_frozen_features
from wardround.client.objectives import FusionObjective
from wardround.client.runtime import get_runtime
from wardround.client.trainer import LocalTrainSpec, evaluate, train_local
from wardround.common.adapter import adapter_sha256, adapter_state, load_adapter_state
from wardround.common.config import GradSampleMode, OptimizerKind
from wardround.models import build_model
from wardround.sitedata.dataset import TensorDictDataset


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_config):
    from wardround.synthetic.hospitals import synthesize_federation

    root = tmp_path_factory.mktemp("frozen-features")
    synthesize_federation(root, 1, patients_per_site=120, seed=3)
    return get_runtime(next(root.glob("*/site.toml")), 0, tiny_config)


def _spec(seed: int, **changes) -> LocalTrainSpec:
    spec = LocalTrainSpec(
        epochs=2, max_steps=0, batch_size=12, learning_rate=0.1, weight_decay=0.0,
        proximal_mu=0.0, seed=seed, modality_dropout=0.2,
        optimizer=OptimizerKind.SGD, momentum=0.9, wide_lr_scale=10.0,
    )  # fmt: skip
    return replace(spec, **changes)


def _count_encoder_calls(model) -> tuple[list[int], list]:
    fusion = cacheable_fusion(model)
    assert fusion is not None
    calls = [0]

    def count(module, args, output):
        calls[0] += 1

    handles = [
        fusion.vision_encoder.register_forward_hook(count),
        fusion.text_encoder.register_forward_hook(count),
    ]
    return calls, handles


@pytest.mark.parametrize(
    "dp",
    [
        None,
        DpTraining(0.8, 0.5, GradSampleMode.HOOKS, secure_mode=False),
        DpTraining(0.8, 0.5, GradSampleMode.GHOST, secure_mode=False),
    ],
    ids=["plain", "dp-hooks", "dp-ghost"],
)
def test_cached_embeddings_train_the_adapter_the_encoders_train(site, dp):
    """Same draws, dropout and noise: the cached run gives the same adapter."""
    model = site.built.model
    assert cacheable_fusion(model) is not None  # the DP recipe freezes the encoders
    initial = adapter_state(model)
    trained = {}
    try:
        for cached in (False, True):
            objective = FusionObjective(frozen_features=cached)
            outcome = train_local(model, site.data.train, _spec(4), dp, objective)
            trained[cached] = adapter_state(model)
            load_adapter_state(model, initial)
    finally:
        load_adapter_state(model, initial)
    assert outcome.steps >= 10
    assert adapter_sha256(trained[True]) != adapter_sha256(initial)
    for name, value in trained[False].items():
        np.testing.assert_allclose(trained[True][name], value, rtol=1e-5, atol=1e-6)


def test_the_encoders_run_once_per_study_per_run(site):
    model = site.built.model
    initial = adapter_state(model)
    objective = FusionObjective()
    # datasets no test has cached yet
    train, validation = (
        TensorDictDataset(d.tensors, d.patients)
        for d in (site.data.train, site.data.validation)
    )
    calls, handles = _count_encoder_calls(model)
    dp = DpTraining(0.8, 0.5, GradSampleMode.HOOKS, secure_mode=False)
    try:
        outcome = train_local(model, train, _spec(0), dp, objective)
        first = calls[0]
        for seed in (1, 2):  # later rounds: the global adapter changes, not the base
            load_adapter_state(model, initial)
            train_local(model, train, _spec(seed), dp, objective)
        evaluate(model, validation, 64, objective)
        evaluate(model, validation, 64, objective)
    finally:
        for handle in handles:
            handle.remove()
        load_adapter_state(model, initial)
    # one pass of each encoder over the training studies, in batches of 64 (the
    # encoders' way would run them at every one of the round's steps) ...
    assert first == 2 * -(-len(train) // 64) < 2 * outcome.steps
    # ... and one over the validation studies, for all later rounds together
    assert calls[0] - first == 2 * -(-len(validation) // 64)


def test_cached_evaluation_equals_the_encoders_evaluation(site):
    model = site.built.model
    plain = evaluate(
        model, site.data.validation, 64, FusionObjective(frozen_features=False)
    )
    cached = evaluate(model, site.data.validation, 64, FusionObjective())
    assert cached.num_examples == plain.num_examples
    assert cached.loss == pytest.approx(plain.loss, rel=1e-5)
    np.testing.assert_allclose(cached.auroc_per_label, plain.auroc_per_label, atol=1e-6)


def test_a_changed_frozen_tensor_or_another_model_recomputes_the_embeddings(
    site, tiny_config
):
    model = site.built.model
    data = site.data.validation
    first = with_frozen_features(model, data)
    assert with_frozen_features(model, data) is first
    assert "features" in first[0] and first[0]["image"].numel() == 0
    fusion = cacheable_fusion(model)
    weight = fusion.ehr_encoder[0].weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(2.0)  # an in-place write: the base changed
        second = with_frozen_features(model, data)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert second is not first
    assert not torch.equal(second.tensors["features"], first.tensors["features"])
    other = build_model(tiny_config).model
    assert with_frozen_features(other, data) is not with_frozen_features(model, data)


@pytest.mark.parametrize(
    "model_changes",
    [{"trainable": "all"}, {"fusion": "cross-attention"}],
    ids=["encoders-train", "cross-attention"],
)
def test_no_cache_where_the_encoders_train_or_tokens_are_fused(
    site, tiny_config, model_changes
):
    config = tiny_config.with_overrides(model=model_changes)
    model = build_model(config).model
    assert cacheable_fusion(model) is None
    assert with_frozen_features(model, site.data.train) is site.data.train


def test_a_model_without_an_image_encoder_reads_the_same_logits_from_the_cache(
    site, tiny_config
):
    """The cache path masks the modalities the model was built without, as the
    encoders' path does (the studies here all have an image)."""
    from torch.utils.data import default_collate

    from wardround.client.objectives import forward

    config = tiny_config.with_overrides(model={"modalities": ["ehr", "note"]})
    model = build_model(config).model.eval()
    data = site.data.validation
    cached = with_frozen_features(model, data)
    assert cached is not data
    rows = range(min(len(data), 16))
    with torch.no_grad():
        direct = forward(model, default_collate([data[i] for i in rows]))
        from_cache = forward(model, default_collate([cached[i] for i in rows]))
    assert data.tensors["present"][:, 0].all()
    torch.testing.assert_close(from_cache, direct, rtol=1e-5, atol=1e-6)


def test_frozen_encoders_with_dropout_train_alike_with_the_cache_or_without(
    site, tiny_config
):
    """A part that does not train runs as in evaluation during training, so its
    dropout is off whether the cache is used or not."""
    model = build_model(tiny_config).model
    fusion = cacheable_fusion(model)
    dropouts = [
        m
        for part in (fusion.vision_encoder, fusion.text_encoder)
        for m in part.modules()
        if isinstance(m, torch.nn.Dropout)
    ]
    assert dropouts
    for m in dropouts:
        m.p = 0.5
    modes: list[bool] = []
    hook = fusion.text_encoder.register_forward_hook(
        lambda module, args, output: modes.append(module.training)
    )
    initial = adapter_state(model)
    dp = DpTraining(0.8, 0.5, GradSampleMode.HOOKS, secure_mode=False)
    trained = {}
    try:
        for cached in (False, True):
            objective = FusionObjective(frozen_features=cached)
            train_local(model, site.data.train, _spec(2), dp, objective)
            trained[cached] = adapter_state(model)
            load_adapter_state(model, initial)
    finally:
        hook.remove()
    assert modes and not any(modes)
    assert fusion.fusion.training  # what trains stays in training mode
    for name, value in trained[False].items():
        np.testing.assert_allclose(trained[True][name], value, rtol=1e-5, atol=1e-6)


def test_the_config_switch_turns_the_cache_off(site, tiny_config):
    config = tiny_config.with_overrides(train={"cache_frozen_features": False})
    spec = LocalTrainSpec.from_config(config, seed=0, proximal_mu=0.0, patients=50)
    assert not spec.cache_frozen_features
    assert not FusionObjective.for_run(config, site.built).frozen_features
    model = site.built.model
    initial = adapter_state(model)
    train = TensorDictDataset(site.data.train.tensors, site.data.train.patients)
    calls, handles = _count_encoder_calls(model)
    try:
        outcome = train_local(model, train, replace(spec, epochs=1), None)
    finally:
        for handle in handles:
            handle.remove()
        load_adapter_state(model, initial)
    assert calls[0] == 2 * outcome.steps  # the encoders ran at every step
