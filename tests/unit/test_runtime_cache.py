"""The site's runtime cache and the round's modality dropout.

A long-lived worker keeps one runtime per (site, settings): a changed training
setting must give a fresh runtime, and the round's modality dropout is the one its
LocalTrainSpec carries.
"""

import pytest

from wardround.client import objectives
from wardround.client.objectives import FusionObjective
from wardround.client.runtime import get_runtime
from wardround.client.trainer import LocalTrainSpec, train_local
from wardround.common.adapter import adapter_state, load_adapter_state


@pytest.fixture(scope="module")
def site_toml(synthetic_sites):
    return sorted(synthetic_sites.glob("*/site.toml"))[0]


@pytest.mark.parametrize(
    "change",
    [
        {"train": {"modality_dropout": 0.3}},
        {"train": {"eval_batch_size": 7}},
        {"train": {"eval_generations": 2}},
        {"federation": {"personal": ["head"]}},
    ],
)
def test_a_changed_training_setting_gets_a_fresh_runtime(
    site_toml, tiny_config, change
):
    first = get_runtime(site_toml, 0, tiny_config)
    changed = tiny_config.with_overrides(**change)
    fresh = get_runtime(site_toml, 0, changed)
    assert fresh is not first
    assert fresh.config == changed


def test_the_same_settings_reuse_the_runtime(site_toml, tiny_config):
    first = get_runtime(site_toml, 0, tiny_config)
    # the round count shapes no runtime: the warm one answers
    other_rounds = tiny_config.with_overrides(federation={"rounds": 9})
    assert get_runtime(site_toml, 0, tiny_config) is first
    assert get_runtime(site_toml, 0, other_rounds) is first


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_training_drops_modalities_at_the_specs_rate(
    site_toml, tiny_config, monkeypatch, dropout
):
    runtime = get_runtime(site_toml, 0, tiny_config)
    # the cached objective was built for the config's dropout; the spec's wins
    assert tiny_config.train.modality_dropout not in (0.0, dropout)
    assert isinstance(runtime.objective, FusionObjective)
    rates = []
    real = objectives.drop_modalities

    def spy(batch, probability, generator):
        rates.append(probability)
        return real(batch, probability, generator)

    monkeypatch.setattr(objectives, "drop_modalities", spy)
    spec = LocalTrainSpec(
        epochs=1, max_steps=2, batch_size=8, learning_rate=1e-3, weight_decay=0.0,
        proximal_mu=0.0, seed=0, modality_dropout=dropout,
    )  # fmt: skip
    initial = adapter_state(runtime.built.model)
    try:
        outcome = train_local(
            runtime.built.model, runtime.data.train, spec, objective=runtime.objective
        )
    finally:
        load_adapter_state(runtime.built.model, initial)
    assert outcome.steps == 2
    assert rates == ([dropout] * 2 if dropout > 0 else [])
