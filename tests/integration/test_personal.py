"""Personalised sites (federation.personal): each site's own modules never leave it,
are not aggregated, and are what it trains and evaluates with."""

import logging

import numpy as np
import pytest
from safetensors.numpy import load_file

from wardround.common.adapter import adapter_state, payload_keys
from wardround.common.errors import ConfigError
from wardround.models import build_model
from wardround.simulations.study.arms import run_federated
from wardround.simulations.study.plan import Cell, StudySettings, StudySize
from wardround.synthetic.hospitals import synthesize_federation

pytestmark = pytest.mark.integration


def test_payload_keys_leave_out_personal_modules_and_refuse_unknown_ones():
    keys = [
        "base_model.model.head.modules_to_save.default.weight",
        "base_model.model.fusion.net.0.lora_A.default.weight",
        "base_model.model.wide.modules_to_save.default.note.weight",
    ]

    assert payload_keys(keys, frozen_lora_a=False, personal=("head", "wide")) == [
        keys[1]
    ]
    with pytest.raises(ConfigError, match="'heads'"):
        payload_keys(keys, frozen_lora_a=False, personal=("heads",))
    with pytest.raises(ConfigError, match="nothing is left"):
        payload_keys(keys, frozen_lora_a=False, personal=("head", "wide", "fusion"))


def test_each_site_keeps_its_own_head_and_the_global_head_never_moves(tmp_path):
    tomls = synthesize_federation(tmp_path / "sites", 3, patients_per_site=30, seed=4)
    settings = StudySettings.for_size(StudySize.SMOKE)
    config = settings.base_config(str(tmp_path / "sites"), Cell(30, 3, "random"), 0)
    config = config.with_overrides(
        federation={"personal": ["head"]}, output={"dir": str(tmp_path / "run")}
    )
    initial = adapter_state(build_model(config).model)

    outcome = run_federated(config, tomls, tmp_path / "run", subgroups=False)

    final = load_file(
        str(tmp_path / "run" / "checkpoints" / "round-002" / "adapter.safetensors")
    )
    head = [k for k in initial if ".head." in k]
    shared = [k for k in initial if ".head." not in k]
    assert head and all(np.array_equal(final[k], initial[k]) for k in head)
    assert any(not np.array_equal(final[k], initial[k]) for k in shared)
    own = [
        load_file(str(p))
        for toml in tomls
        for p in (toml.parent / ".wardround-cache" / "personal").glob("*.safetensors")
    ]
    assert len(own) == 3 and all(set(o) == set(head) for o in own)
    assert not np.array_equal(own[0][head[0]], own[1][head[0]])
    assert not np.array_equal(own[0][head[0]], initial[head[0]])
    assert all(np.isfinite(v) for v in outcome.final.values())


def test_two_sites_sharing_a_cache_folder_keep_their_own_modules(tmp_path):
    from types import SimpleNamespace

    from wardround.client.personal import _path

    def runtime(name: str):
        return SimpleNamespace(
            site=SimpleNamespace(cache_path=tmp_path, site=SimpleNamespace(name=name))
        )

    run = "same-approved-settings"
    assert _path(runtime("site-01"), run) != _path(runtime("site-02"), run)
    assert _path(runtime("site-01"), run) == _path(runtime("site-01"), run)


def test_a_sites_own_model_stays_home_and_is_mixed_into_its_evaluation(
    tmp_path, caplog
):

    from wardround.client.objectives import FusionObjective
    from wardround.client.own_model import mixed_outcome
    from wardround.common.adapter import load_adapter_state
    from wardround.simulations.study.arms import _sites

    tomls = synthesize_federation(tmp_path / "sites", 3, patients_per_site=30, seed=4)
    settings = StudySettings.for_size(StudySize.SMOKE)
    base = settings.base_config(
        str(tmp_path / "sites"), Cell(30, 3, "random"), 0
    ).with_overrides(privacy={"enabled": False})
    mixed = base.with_overrides(
        federation={"own_model_weight": 0.5}, output={"dir": str(tmp_path / "mixed")}
    )
    plain = base.with_overrides(output={"dir": str(tmp_path / "plain")})

    # Plain first, in the same process: the site runtimes it builds are reused.
    run_federated(plain, tomls, tmp_path / "plain", subgroups=False)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="wardround.server.federation")
    outcome = run_federated(mixed, tomls, tmp_path / "mixed", subgroups=False)
    # no one global model is scored: the coordinator's log does not call it one
    assert "round 2: AUROC of the sites' personalised models" in caplog.text
    assert "global AUROC" not in caplog.text

    # What the sites sent is FedAvg's own: the global adapters are the same.
    final = "checkpoints/round-002/adapter.safetensors"
    sent = load_file(str(tmp_path / "mixed" / final))
    fedavg = load_file(str(tmp_path / "plain" / final))
    assert sent.keys() == fedavg.keys()
    assert all(np.array_equal(sent[k], fedavg[k]) for k in sent)
    own = {
        toml.parent.name: load_file(str(path))
        for toml in tomls
        for path in (toml.parent / ".wardround-cache" / "personal").glob(
            "*.own.safetensors"
        )
    }
    assert sorted(own) == ["site-01", "site-02", "site-03"]
    assert all(o.keys() == sent.keys() for o in own.values())
    assert any(not np.array_equal(own["site-01"][k], sent[k]) for k in sent)
    assert any(not np.array_equal(own["site-01"][k], own["site-02"][k]) for k in sent)

    # Each site reported the AUROC of the even mixture of the two models.
    model = build_model(mixed).model
    objective = FusionObjective()
    differs = []
    for site in _sites(mixed, tomls):
        load_adapter_state(model, sent)
        global_scores, labels = objective.predict_logits(
            model, site.data.validation, 64
        )
        load_adapter_state(model, own[site.name])
        own_scores, _ = objective.predict_logits(model, site.data.validation, 64)
        expected = mixed_outcome(global_scores, own_scores, labels, 0.5, 0.0)
        assert outcome.final[site.name] == pytest.approx(expected.auroc_macro, abs=1e-3)
        alone = mixed_outcome(global_scores, own_scores, labels, 0.0, 0.0)
        differs.append(abs(alone.auroc_macro - expected.auroc_macro) > 1e-3)
    assert any(differs)  # the sites did not report the global model alone
