"""The site's runtime cache and the round's modality dropout.

A long-lived worker keeps one runtime per (site, settings): a changed training
setting must give a fresh runtime, and the round's modality dropout is the one its
LocalTrainSpec carries.
"""

from pathlib import Path

import pytest

from wardround.client import objectives
from wardround.client import runtime as runtime_module
from wardround.client.objectives import FusionObjective
from wardround.client.runtime import get_runtime, model_bytes, shareable
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


def test_the_sites_of_one_run_config_share_its_model(synthetic_sites, tiny_config):
    first, second = sorted(synthetic_sites.glob("*/site.toml"))[:2]

    a = get_runtime(first, 0, tiny_config)
    b = get_runtime(second, 1, tiny_config)

    assert a is not b and a.data is not b.data
    assert a.built is b.built
    other = get_runtime(
        first, 0, tiny_config.with_overrides(train={"eval_batch_size": 5})
    )
    assert other.built is not a.built  # another config, another model


def test_a_model_with_running_statistics_is_not_shared():
    import torch

    assert shareable(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
    assert not shareable(
        torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    )


def test_the_cache_keeps_sites_while_they_fit_in_memory(
    synthetic_sites, tiny_config, monkeypatch
):
    tomls = sorted(synthetic_sites.glob("*/site.toml"))[:3]
    runtimes = [get_runtime(t, i, tiny_config) for i, t in enumerate(tomls)]
    again = [get_runtime(t, i, tiny_config) for i, t in enumerate(tomls)]
    assert all(x is y for x, y in zip(again, runtimes, strict=True))

    # room for the model and one site's data: the least recently used are dropped
    room = sum(model_bytes(runtimes[0].built.model).values()) + runtimes[0].data.nbytes
    monkeypatch.setattr(runtime_module, "memory_budget", lambda device: room)
    monkeypatch.setattr(runtime_module, "_CACHE", runtime_module.OrderedDict())
    for i, t in enumerate(tomls):
        get_runtime(t, i, tiny_config)
    assert [Path(k[0]) for k in runtime_module._CACHE] == [tomls[-1].resolve()]
