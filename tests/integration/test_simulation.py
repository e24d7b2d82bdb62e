"""A 3-site × 2-round federation through Flower's simulation engine (Ray) on CPU,
with the defaults (DP-SGD and SecAgg+, which needs at least 3 sites)."""

import json
import time

import numpy as np
import psutil
import pytest

from wardround.ops.config_file import load_run_config
from wardround.ops.processes import descendants

pytestmark = pytest.mark.integration

SITES = ["site-01", "site-02", "site-03"]


def _weighted_auroc(evals: list[dict]) -> float:
    """The sites' AUROCs weighted by their validation examples (the global one)."""
    return sum(e["auroc_macro"] * e["num_examples"] for e in evals) / sum(
        e["num_examples"] for e in evals
    )


def _described(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"{pid} {proc.status()} {' '.join(proc.cmdline())[:200]}"
    except psutil.Error as err:
        return f"{pid} ({type(err).__name__})"


def test_three_sites_two_rounds_write_a_complete_run_directory(
    three_sites, tiny_config, tmp_path
):
    from peft import PeftModel

    from wardround import __version__
    from wardround.common.adapter import adapter_state
    from wardround.common.release import version_from_metrics, version_metrics
    from wardround.models import build_base_model
    from wardround.simulations.runner import prepare_simulation, run_simulation_engine
    from wardround.sitedata.site_config import SiteConfig

    before = set(descendants())
    config = tiny_config.with_overrides(data={"sites_dir": str(three_sites)})
    config, n_sites = prepare_simulation(
        config, out_dir=tmp_path / "run", sites=None, rounds=2
    )
    assert n_sites == 3

    result = run_simulation_engine(config, n_sites)

    run_dir = tmp_path / "run"
    # every process the simulation started is gone (a process that is already
    # exiting gets a few seconds to finish; one that stays is named)
    deadline = time.monotonic() + 10
    while (left := set(descendants()) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [_described(pid) for pid in left]
    lines = [
        json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in lines] == [0, 1, 2]
    for r in lines[1:]:
        assert sorted(t["site"] for t in r["train"]) == SITES
        assert all(t["bytes_sent"] > 0 for t in r["train"])
        assert sorted(e["site"] for e in r["evaluate"]) == SITES
        assert r["global_auroc"] == pytest.approx(_weighted_auroc(r["evaluate"]))
        # where the round's time went: each phase, and each site's evaluation
        phases = r["extra"]["phase_seconds"]
        assert 0 < phases["train"] and 0 < phases["evaluate"]
        assert phases["train"] + phases["evaluate"] <= r["seconds"]
        assert all(e["seconds"] > 0 for e in r["evaluate"])
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["rounds_completed"] == 2
    assert set(summary["final"]["sites"]) == set(SITES)
    assert set(summary["bytes_sent_per_site"]) == set(SITES)
    assert (run_dir / "plots" / "auroc.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / "round-002" / "adapter.safetensors").is_file()
    manifest = json.loads((run_dir / "manifests" / "round-002.json").read_text())
    assert manifest["adapter_sha256"] == lines[-1]["adapter_sha256"]
    assert len(manifest["participants"]) == 3

    # the final adapter loads onto a freshly built base model and is the trained one
    saved_config = load_run_config(run_dir / "run-config.toml")
    base, fingerprint = build_base_model(saved_config)
    assert fingerprint == summary["model"]["base_model_fingerprint"]
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    from safetensors.numpy import load_file

    final = load_file(
        str(run_dir / "checkpoints" / "round-002" / "adapter.safetensors")
    )
    loaded = adapter_state(model)
    assert set(loaded) == set(final)
    assert all(np.array_equal(loaded[k], final[k]) for k in final)
    assert result.rounds[-1].adapter_sha256 != result.rounds[0].adapter_sha256

    # By default: DP-SGD at every site and SecAgg+, and every output says so.
    assert summary["aggregation"] == ["secagg+"]
    assert manifest["aggregation"] == "secagg+"
    assert manifest["secure_aggregation"]["max_abs_error_per_coordinate"] < 1e-5
    assert manifest["differential_privacy"]["target-epsilon"] == 8.0
    for site in SITES:
        spent = summary["privacy_spent"][site]
        rounds = [r["epsilon_run"] for r in spent["per_round"]]
        assert len(rounds) == 2 and 0 < rounds[0] < rounds[1] <= 8.0 * 1.001
        assert spent["epsilon_run_prv"] > 0
        assert manifest["privacy_spent"][site]["epsilon_run"] == rounds[-1]
        # Each site states its lifetime budget beside its lifetime spend.
        floor = SiteConfig.from_toml(three_sites / site / "site.toml").privacy
        assert spent["epsilon_budget"] == floor.budget_epsilon
    # Each site states its wardround release (as numbers) with every reply.
    release = version_from_metrics(version_metrics(__version__))
    assert release is not None
    for r in lines[1:]:
        assert [t["software_version"] for t in r["train"]] == [release] * 3
        assert [e["software_version"] for e in r["evaluate"]] == [release] * 3
    assert (run_dir / "plots" / "privacy.png").stat().st_size > 0
