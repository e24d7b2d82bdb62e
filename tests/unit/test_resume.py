"""Resuming a run from its last intact checkpoint (output.resume), with the real site
ClientApps on an in-process grid; and RoundRecord's JSON round trip it relies on."""

import json
import math

import pytest

from wardround.client.app import build_client_app
from wardround.common.errors import ConfigError
from wardround.server.federation import run_federation
from wardround.server.records import (
    PrivacySpend,
    RoundRecord,
    SiteEvalReport,
    SiteFailure,
    SiteTrainReport,
)
from wardround.server.rundir import _clean
from wardround.simulations.local_grid import LocalGrid


class Crash(Exception):
    """Stands for the coordinator dying after a round was written."""


class CrashAfter:
    """An observer that kills the run once round ``n`` is written."""

    def __init__(self, n):
        self.n = n

    def on_start(self, total_rounds):
        pass

    def on_round(self, record):
        if record.round == self.n:
            raise Crash(f"crashed after round {record.round}")


@pytest.fixture(scope="module")
def config(synthetic_sites, tiny_config):
    # No DP, no SecAgg: fast, and the rounds are reproducible.
    return tiny_config.with_overrides(
        data={"sites_dir": str(synthetic_sites)},
        train={"max_steps": 2},
        federation={"rounds": 3, "min_sites": 2},
        privacy={"enabled": False},
        secure_aggregation={"enabled": False},
    )


def _grid(config):
    nodes = {1000 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)}
    run_config = config.to_flower()
    apps = {node: build_client_app(run_config) for node in nodes}
    return LocalGrid(apps, nodes, run_config)


def _crash(config, run_dir, after):
    with pytest.raises(Crash):
        run_federation(
            _grid(config), config, run_dir=run_dir, observer=CrashAfter(after)
        )


def _resume(config, run_dir, observer=None):
    resumed = config.with_overrides(output={"resume": True})
    return run_federation(_grid(resumed), resumed, run_dir=run_dir, observer=observer)


def _rounds(run_dir):
    return [
        json.loads(line)["round"]
        for line in (run_dir / "rounds.jsonl").read_text().splitlines()
    ]


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """The same run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run_federation(_grid(config), config, run_dir=run_dir)


def test_a_crashed_run_resumes_after_its_last_checkpoint(config, reference, tmp_path):
    run_dir = tmp_path / "run"
    _crash(config, run_dir, after=1)
    run_id = _json(run_dir / "run-state.json")["run_id"]
    assert _json(run_dir / "status.json")["state"] == "failed"
    assert _rounds(run_dir) == [0, 1]
    with (run_dir / "rounds.jsonl").open("a") as handle:
        handle.write('{"round": 2, "train": [{"node')  # torn by the crash mid-append

    result = _resume(config, run_dir)

    assert _rounds(run_dir) == [0, 1, 2, 3]
    for server_round in (2, 3):
        assert (run_dir / "manifests" / f"round-{server_round:03d}.json").is_file()
        assert (run_dir / "checkpoints" / f"round-{server_round:03d}").is_dir()
    summary = _json(run_dir / "run.json")
    assert summary["rounds_completed"] == 3
    assert summary["resumed_from_round"] == 1
    assert summary["run_id"] == run_id == _json(run_dir / "run-state.json")["run_id"]
    assert [r.round for r in result.rounds] == [0, 1, 2, 3]
    assert len(summary["history"]["global_auroc"]) == 4
    # bytes cover the reloaded rounds too
    assert summary["bytes_sent_per_site"] == reference.summary["bytes_sent_per_site"]
    status = _json(run_dir / "status.json")
    assert status["state"] == "finished" and status["round"] == 3
    assert status["run_id"] == run_id and status["reason"] is None
    # Sites seed their training per (run seed, site, round) with a fresh optimizer
    # each round, and the checkpoint holds the exact float32 adapter: a resumed
    # run ends where the uninterrupted one did.
    assert result.rounds[-1].adapter_sha256 == reference.rounds[-1].adapter_sha256
    assert [r.adapter_sha256 for r in result.rounds] == [
        r.adapter_sha256 for r in reference.rounds
    ]


def test_a_damaged_checkpoint_falls_back_to_the_round_before(
    config, reference, tmp_path
):
    run_dir = tmp_path / "run"
    _crash(config, run_dir, after=2)
    checkpoint = run_dir / "checkpoints" / "round-002" / "adapter.safetensors"
    data = bytearray(checkpoint.read_bytes())
    for i in range(len(data) - 40, len(data) - 8):  # inside the tensor data
        data[i] ^= 0xFF
    checkpoint.write_bytes(bytes(data))

    result = _resume(config, run_dir)

    assert _json(run_dir / "run.json")["resumed_from_round"] == 1
    assert _rounds(run_dir) == [0, 1, 2, 3]
    assert result.rounds[-1].adapter_sha256 == reference.rounds[-1].adapter_sha256


def test_a_run_resumed_twice_lists_both_rounds(config, tmp_path):
    run_dir = tmp_path / "run"
    _crash(config, run_dir, after=1)
    with pytest.raises(Crash):
        _resume(config, run_dir, observer=CrashAfter(2))
    _resume(config, run_dir)
    summary = _json(run_dir / "run.json")
    assert summary["resumed_from_round"] == [1, 2]
    assert _rounds(run_dir) == [0, 1, 2, 3]


def test_resuming_with_another_config_is_refused(config, tmp_path):
    run_dir = tmp_path / "run"
    _crash(config, run_dir, after=1)
    changed = config.with_overrides(
        train={"learning_rate": 0.01}, output={"resume": True}
    )
    with pytest.raises(ConfigError, match=r"section\(s\) train differ"):
        run_federation(_grid(changed), changed, run_dir=run_dir)
    assert _rounds(run_dir) == [0, 1]  # nothing was touched
    status = _json(run_dir / "status.json")
    assert status["state"] == "failed" and "train" in status["reason"]


def test_resume_without_a_checkpoint_starts_from_round_zero(config, tmp_path, caplog):
    no_checkpoints = config.with_overrides(output={"checkpoint_every": 0})
    run_dir = tmp_path / "run"
    _crash(no_checkpoints, run_dir, after=1)
    first_id = _json(run_dir / "run-state.json")["run_id"]

    result = _resume(no_checkpoints, run_dir)  # [output] may change: allowed

    assert "no intact checkpoint" in caplog.text
    assert _rounds(run_dir) == [0, 1, 2, 3]
    summary = _json(run_dir / "run.json")
    assert summary["resumed_from_round"] is None
    assert summary["run_id"] != first_id  # a new run: its rounds are all new
    assert len(result.rounds) == 4


# -- RoundRecord's JSON round trip ---------------------------------------------
def _record(auroc=0.71):
    return RoundRecord(
        round=2,
        train=[
            SiteTrainReport(
                node_id=1000,
                site="site-01",
                num_examples=32,
                loss=0.61,
                steps=4,
                seconds=1.5,
                delta_l2=0.25,
                bytes_sent=12345,
                delta_clipped=True,
                privacy=PrivacySpend(
                    epsilon_run=1.2,
                    epsilon_run_prv=1.1,
                    epsilon_total=3.4,
                    delta=1e-5,
                    noise_multiplier=1.3,
                    sample_rate=0.25,
                    steps=4,
                    max_grad_norm=1.0,
                ),
            ),
            SiteTrainReport(1001, "site-02", 30, 0.65, 4, 1.4, 0.3, 12000),
        ],
        evaluate=[
            SiteEvalReport(1000, "site-01", 8, 0.55, auroc, {"nodule": 0.6}),
        ],
        failures=[
            SiteFailure(
                1002,
                "train",
                "[PrivacyBudgetExhausted] privacy budget exhausted: ...",
                "PrivacyBudgetExhausted",
            ),
            SiteFailure(1003, "evaluate", "no reply within ..."),
        ],
        global_auroc=auroc,
        global_loss=0.55,
        train_loss=0.63,
        adapter_sha256="ab" * 32,
        seconds=3.2,
        aggregation_seconds=0.01,
        aggregation="secagg+",
        secure_aggregation={"sites_sampled": 3, "max_abs_error_per_coordinate": 1e-6},
        extra={"note": "x"},
    )


def test_round_record_round_trips_through_to_json():
    record = _record()
    assert RoundRecord.from_json(record.to_json()) == record
    line = json.dumps(_clean(record.to_json()))
    assert RoundRecord.from_json(json.loads(line)) == record


def test_nan_metrics_written_as_null_come_back_as_nan():
    record = _record(auroc=float("nan"))
    back = RoundRecord.from_json(json.loads(json.dumps(_clean(record.to_json()))))
    assert math.isnan(back.global_auroc) and math.isnan(back.evaluate[0].auroc_macro)
    assert back.failures == record.failures and back.train == record.train


def test_a_new_run_in_a_used_directory_sets_the_earlier_one_aside(
    config, reference, tmp_path
):
    run_dir = tmp_path / "run"
    _crash(config, run_dir, after=1)
    first_id = _json(run_dir / "run-state.json")["run_id"]

    run_federation(_grid(config), config, run_dir=run_dir)

    (earlier,) = (run_dir / "earlier-runs").iterdir()
    assert earlier.name.endswith(first_id)
    assert _rounds(earlier) == [0, 1]  # the first run's history, not overwritten
    assert (earlier / "checkpoints" / "round-001").is_dir()
    assert _json(earlier / "run-state.json")["run_id"] == first_id
    assert _rounds(run_dir) == [0, 1, 2, 3]
    assert _json(run_dir / "run.json")["run_id"] != first_id
    assert not (run_dir / "checkpoints" / "round-001").samefile(
        earlier / "checkpoints" / "round-001"
    )
