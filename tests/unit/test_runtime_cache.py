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
from wardround.client.runtime import forget_model, get_runtime, shareable
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


@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty cache for the test, the process's own cache kept as it was."""
    monkeypatch.setattr(runtime_module, "_CACHE", runtime_module.OrderedDict())
    monkeypatch.setattr(runtime_module, "_SHARED", {})


def test_the_cache_keeps_sites_while_their_data_fits_in_memory(
    three_sites, tiny_config, monkeypatch, fresh_cache
):
    config = tiny_config.with_overrides(train={"device": "cpu"})
    tomls = sorted(three_sites.glob("*/site.toml"))
    runtimes = [get_runtime(t, i, config) for i, t in enumerate(tomls)]
    again = [get_runtime(t, i, config) for i, t in enumerate(tomls)]
    assert all(x is y for x, y in zip(again, runtimes, strict=True))

    # Room for one site's data (the shared model is a fixed cost): the least
    # recently used sites are dropped, the model stays.
    room = max(r.data.nbytes for r in runtimes)
    monkeypatch.setattr(runtime_module, "memory_budget", lambda device: room)
    runtime_module._CACHE.clear()
    for i, t in enumerate(tomls):
        get_runtime(t, i, config)
    assert [Path(k[0]) for k in runtime_module._CACHE] == [tomls[-1].resolve()]
    assert get_runtime(tomls[-1], 2, config).built is runtimes[0].built


def test_a_failed_training_drops_the_shared_model(
    synthetic_sites, tiny_config, fresh_cache
):
    first, second = sorted(synthetic_sites.glob("*/site.toml"))[:2]
    a = get_runtime(first, 0, tiny_config)
    get_runtime(second, 1, tiny_config)

    forget_model(a)

    assert not runtime_module._CACHE and not runtime_module._SHARED
    assert get_runtime(first, 0, tiny_config).built is not a.built


def _frozen_fingerprint(model):
    frozen = [t for t in model.parameters() if not t.requires_grad]
    return [t.detach().clone() for t in (*frozen, *model.buffers())]


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp-sgd"])
def test_a_site_sees_the_shared_model_as_a_fresh_one_after_another_trained_it(
    synthetic_sites, tiny_config, fresh_cache, private
):
    from wardround.client.dp import DpTraining
    from wardround.client.trainer import evaluate
    from wardround.common.config import GradSampleMode
    from wardround.models import build_model

    first, second = sorted(synthetic_sites.glob("*/site.toml"))[:2]
    a = get_runtime(first, 0, tiny_config)
    b = get_runtime(second, 1, tiny_config)
    model = a.built.model
    global_state = adapter_state(model)
    frozen = _frozen_fingerprint(model)
    spec = LocalTrainSpec(
        epochs=1, max_steps=3, batch_size=8, learning_rate=1e-2, weight_decay=0.0,
        proximal_mu=0.0, seed=0, modality_dropout=0.0,
    )  # fmt: skip
    dp = DpTraining(1.0, 1.0, GradSampleMode.HOOKS, False) if private else None

    train_local(model, a.data.train, spec, dp, objective=a.objective)
    assert adapter_state(model).keys() == global_state.keys()
    load_adapter_state(b.built.model, global_state)  # what each message does first
    seen_by_b = evaluate(b.built.model, b.data.validation, 16)

    fresh = build_model(tiny_config).model
    load_adapter_state(fresh, global_state)
    assert all(
        (x == y).all() for x, y in zip(_frozen_fingerprint(model), frozen, strict=True)
    )
    assert seen_by_b.loss == evaluate(fresh, b.data.validation, 16).loss
    assert seen_by_b.auroc_macro == evaluate(fresh, b.data.validation, 16).auroc_macro


def test_the_sites_cached_embeddings_count_in_the_memory_budget(
    three_sites, tiny_config, monkeypatch, fresh_cache
):
    """Room for three sites' data but not for their embeddings too: loading the
    third site drops the least recently used one."""
    from wardround.client.frozen_features import cached_nbytes, with_frozen_features

    config = tiny_config.with_overrides(train={"device": "cpu"})
    tomls = sorted(three_sites.glob("*/site.toml"))
    runtimes = [get_runtime(t, i, config) for i, t in enumerate(tomls)]
    data = sum(r.data.nbytes for r in runtimes)
    runtime_module._CACHE.clear()
    monkeypatch.setattr(runtime_module, "memory_budget", lambda device: data)
    for i, t in enumerate(tomls[:2]):
        runtime = get_runtime(t, i, config)
        assert cached_nbytes(runtime.data.train) == 0
        cached = with_frozen_features(runtime.built.model, runtime.data.train)
        assert cached_nbytes(runtime.data.train) == cached.tensors["features"].nbytes
        assert cached_nbytes(runtime.data.train) > 0
    get_runtime(tomls[2], 2, config)
    assert [Path(k[0]) for k in runtime_module._CACHE] == [
        t.resolve() for t in tomls[1:]
    ]
