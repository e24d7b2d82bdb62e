"""Personalised sites (federation.personal): each site's own modules never leave it,
are not aggregated, and are what it trains and evaluates with."""

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
