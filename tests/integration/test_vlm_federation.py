"""2 sites x 2 rounds of the ``vlm`` family through the real ServerApp round loop
and the real site ClientApps (in-process grid: Flower's message encoding, the
egress guard, DP-SGD and the privacy ledger all as in a deployment). Plain
aggregation: SecAgg+ needs 3 sites, and its path is the same for any adapter
(tests/integration/test_secure_rounds.py)."""

import json

import numpy as np
import pytest

from wardround.client.app import build_client_app
from wardround.common.config import RunConfig
from wardround.ops.config_file import load_run_config
from wardround.server.federation import run_federation
from wardround.simulations.local_grid import LocalGrid
from wardround.simulations.samples import gather_samples

pytestmark = pytest.mark.integration


def _config(sites, arch, kind, *, dp):
    return RunConfig().with_overrides(
        model={"family": "vlm", "tiny_arch": arch, "image_size": 32},
        task={"kind": kind},
        train={
            "batch_size": 4,
            "local_epochs": 2,
            "learning_rate": 0.02,
            "eval_generations": 2,
            "max_steps": 0,
        },
        data={"sites_dir": str(sites)},
        federation={"rounds": 2, "min_sites": 2},
        privacy={"enabled": dp},
        secure_aggregation={"enabled": False},
    )


def _run(config, run_dir):
    nodes = {1000 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)}
    run_config = config.to_flower()
    apps = {node: build_client_app(run_config) for node in nodes}
    grid = LocalGrid(apps, nodes, run_config)
    return run_federation(grid, config, run_dir=run_dir)


@pytest.mark.parametrize(
    ("arch", "kind", "dp"),
    [
        ("llava", "report", False),
        ("llava", "report", True),
        ("paligemma", "report", False),
        ("paligemma", "vqa", True),
    ],
)
def test_two_sites_two_rounds_train_a_vlm_adapter(
    synthetic_sites, tmp_path, arch, kind, dp
):
    from peft import PeftModel

    from wardround.common.adapter import adapter_state
    from wardround.models import build_base_model

    config = _config(synthetic_sites, arch, kind, dp=dp)
    run_dir = tmp_path / "run"

    result = _run(config, run_dir)

    rounds = [
        json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert sorted(t["site"] for t in record["train"]) == ["site-01", "site-02"]
    # only numbers came back: per-site generative scores, the texts stayed home
    scores = rounds[-1]["extra"]["generative"]
    # each site generated 2; a count leaves rounded up to its granularity (10)
    assert scores["eval-perplexity"] > 1.0 and scores["eval-generated"] == 20
    wanted = "exact-match" if kind == "vqa" else "label-agreement"
    # each global score is the sites' weighted by the examples each generated for
    evals = rounds[-1]["evaluate"]
    generated = [e["metrics"]["eval-generated"] for e in evals]
    assert generated == [10, 10]
    for name in (wanted, "text-overlap-chrf"):
        assert scores[name] == pytest.approx(
            sum(e["metrics"][name] * g for e, g in zip(evals, generated, strict=True))
            / sum(generated)
        )
    # validation loss falls from the untrained round 0
    losses = [r["global_loss"] for r in rounds]
    assert losses[2] < losses[0]
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["final"]["global"]["eval-perplexity"] == pytest.approx(
        scores["eval-perplexity"]
    )
    assert rounds[-1]["aggregation"] == "plain"
    if dp:
        for site in ("site-01", "site-02"):
            spent = summary["privacy_spent"][site]["per_round"]
            assert 0 < spent[0]["epsilon_run"] < spent[1]["epsilon_run"] <= 8.0 * 1.001

    # the generated samples stay at the sites until the simulation gathers them
    copied = gather_samples(synthetic_sites, result.summary["run_id"], run_dir)
    assert [p.relative_to(run_dir).as_posix() for p in copied] == [
        f"samples/site-{s:02d}/round-{r:03d}.jsonl" for s in (1, 2) for r in (0, 1, 2)
    ]
    sample = json.loads(copied[-1].read_text().splitlines()[0])
    assert set(sample) == {"example", "prompt", "reference", "generated"}

    # the final adapter loads onto the base model rebuilt from the saved config
    saved = load_run_config(run_dir / "run-config.toml")
    base, fingerprint = build_base_model(saved)
    assert fingerprint == summary["model"]["base_model_fingerprint"]
    loaded = adapter_state(PeftModel.from_pretrained(base, str(run_dir / "adapter")))
    from safetensors.numpy import load_file

    final = load_file(
        str(run_dir / "checkpoints" / "round-002" / "adapter.safetensors")
    )
    assert set(loaded) == set(final)
    assert all(np.array_equal(loaded[k], final[k]) for k in final)
    assert result.rounds[-1].adapter_sha256 != result.rounds[0].adapter_sha256
