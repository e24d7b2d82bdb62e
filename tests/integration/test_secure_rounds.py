"""Whole rounds with the real site ClientApps on an in-process grid (no Ray):
DP-SGD, SecAgg+, the egress guard and FFA-LoRA together, and a site that vanishes
in the middle of a SecAgg+ round (4 sites: the others aggregate; 3 sites: the two
left refuse to unmask)."""

import json

import pytest

from wardround.client.app import build_client_app
from wardround.server.federation import run_federation
from wardround.simulations.local_grid import LocalGrid, vanish_at_secagg_stage

pytestmark = pytest.mark.integration


def _grid(config, sites, vanish=None):
    nodes = {
        1000 + i: {"partition-id": i, "num-partitions": sites} for i in range(sites)
    }
    run_config = config.to_flower()
    apps = {node: build_client_app(run_config) for node in nodes}
    return LocalGrid(apps, nodes, run_config, vanish=vanish)


def test_ffa_lora_under_dp_and_secagg_trains_and_reports(
    three_sites, tiny_config, tmp_path
):
    config = tiny_config.with_overrides(
        data={"sites_dir": str(three_sites)},
        model={"lora_variant": "ffa"},
        train={"max_steps": 2},
        federation={"rounds": 2, "min_sites": 3},
    )
    result = run_federation(_grid(config, 3), config, run_dir=tmp_path / "run")
    last = result.rounds[-1]
    assert last.aggregation == "secagg+" and len(last.train) == 3
    assert all(t.privacy is not None and t.privacy.epsilon_run > 0 for t in last.train)
    # FFA: the frozen A factors are not sent and never change
    first = json.loads((tmp_path / "run" / "manifests" / "round-001.json").read_text())
    assert first["lora_variant"] == "ffa"
    assert (
        result.summary["model"]["adapter_payload_tensors"]
        < result.summary["model"]["adapter_tensors"]
    )


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory):
    """Four small hospitals: one can drop and still leave 3 to aggregate."""
    from wardround.synthetic.hospitals import synthesize_federation

    root = tmp_path_factory.mktemp("four-sites")
    synthesize_federation(root, 4, patients_per_site=40, seed=13)
    return root


def test_a_site_vanishing_mid_secagg_round_leaves_a_round_of_the_others(
    four_sites, tiny_config, tmp_path
):
    config = tiny_config.with_overrides(
        data={"sites_dir": str(four_sites)},
        train={"max_steps": 2},
        federation={"rounds": 1, "min_sites": 3},
        secure_aggregation={"num_shares": 1.0, "reconstruction_threshold": 3},
    )
    victim = 1001

    vanish = vanish_at_secagg_stage("collect_masked_vectors", [victim])

    result = run_federation(_grid(config, 4, vanish), config, run_dir=tmp_path / "run")
    round_one = result.rounds[1]
    assert sorted(t.node_id for t in round_one.train) == [1000, 1002, 1003]
    assert [f.node_id for f in round_one.failures if f.phase == "train"] == [victim]
    assert round_one.secure_aggregation["sites_aggregated"] == 3
    assert round_one.adapter_sha256 != result.rounds[0].adapter_sha256


def test_a_secagg_round_left_with_two_sites_is_never_unmasked(
    three_sites, tiny_config, tmp_path
):
    # One of 3 drops after sharing its keys: its pairwise masks would be rebuilt,
    # leaving each survivor behind one 32-bit seed. Both refuse to unmask.
    from wardround.common.errors import FederationError

    config = tiny_config.with_overrides(
        data={"sites_dir": str(three_sites)},
        train={"max_steps": 1},
        federation={"rounds": 1, "min_sites": 3},
        secure_aggregation={"num_shares": 1.0, "reconstruction_threshold": 2},
    )
    victim = 1001
    vanish = vanish_at_secagg_stage("collect_masked_vectors", [victim])

    with pytest.raises(FederationError):
        run_federation(_grid(config, 3, vanish), config, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["rounds_completed"] == 0
    assert "SecureAggregationRefused" in summary["stop_reason"]
    assert "mask partners alive" in summary["stop_reason"]


def _sites_with(three_sites, tmp_path, **privacy):
    import shutil
    import tomllib

    import tomli_w

    root = tmp_path / "sites"
    shutil.copytree(three_sites, root, ignore=shutil.ignore_patterns("privacy-ledger"))
    for site_toml in root.glob("*/site.toml"):
        doc = tomllib.loads(site_toml.read_text())
        doc["privacy"].update({k.replace("_", "-"): v for k, v in privacy.items()})
        site_toml.write_text(tomli_w.dumps(doc))
    return root


@pytest.mark.parametrize("secure", [False, True])
def test_sites_that_refuse_stop_the_run_cleanly_with_its_rounds_written(
    three_sites, tiny_config, tmp_path, secure
):
    from wardround.common.errors import PrivacyPolicyRefused

    sites = _sites_with(three_sites, tmp_path, max_epsilon=4.0)  # the run asks for 8
    config = tiny_config.with_overrides(
        data={"sites_dir": str(sites)},
        train={"max_steps": 1},
        federation={"rounds": 2, "min_sites": 3},
        secure_aggregation={"enabled": secure},
    )
    # exit code 8, the floor's, not 6, a spent budget's
    with pytest.raises(
        PrivacyPolicyRefused, match="less privacy than this site allows"
    ):
        run_federation(_grid(config, 3), config, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["status"].startswith("stopped")
    assert "PrivacyPolicyRefused" in summary["stop_reason"]
    assert summary["rounds_completed"] == 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
