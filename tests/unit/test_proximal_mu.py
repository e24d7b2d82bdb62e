"""FedProx's mu: refused without FedProx, recorded as sent, applied from the site's config."""

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from typer.testing import CliRunner

from wardround.cli import app as cli_app
from wardround.client import trainer
from wardround.client.app import handle_train
from wardround.common import wire
from wardround.common.adapter import adapter_state, to_record, wire_header
from wardround.common.config import RunConfig, Strategy
from wardround.common.errors import ConfigError
from wardround.models import build_model
from wardround.ops.config_file import load_run_config
from wardround.server.records import RoundRecord
from wardround.server.run_report import manifest
from wardround.server.strategies import make_strategy


def test_mu_with_fedavg_is_refused_saying_what_to_fix():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({"federation": {"proximal-mu": 0.1}})
    text = str(info.value)
    assert "proximal-mu = 0.1 needs strategy 'fedprox'" in text
    assert "--strategy fedprox" in text


def test_mu_with_fedavg_is_refused_from_a_flower_run_config():
    flat = RunConfig().to_flower()
    flat["federation.proximal-mu"] = 0.1
    with pytest.raises(ConfigError, match="needs strategy 'fedprox'"):
        RunConfig.from_flower(flat)


def test_mu_with_fedavg_is_refused_from_run_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[federation]\nstrategy = "fedavg"\nproximal-mu = 0.5\n')
    with pytest.raises(ConfigError, match="needs strategy 'fedprox'"):
        load_run_config(path)


def test_simulate_refuses_mu_without_fedprox_before_any_work(tmp_path):
    out = tmp_path / "run"
    # Sites that do not exist: were mu let through, the command would stop on them
    # (another message) rather than run a federation.
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\nsites-dir = "{tmp_path / "nowhere"}"\n')
    result = CliRunner().invoke(
        cli_app,
        ["simulate", "--proximal-mu", "0.1", "--config", str(config)]
        + ["--out", str(out)],
    )
    assert result.exit_code == 2
    assert "needs strategy 'fedprox'" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_fedprox_with_mu_and_fedavg_without_are_accepted():
    fedprox = RunConfig.from_mapping(
        {"federation": {"strategy": "fedprox", "proximal-mu": 0.1}}
    )
    assert fedprox.federation.proximal_mu == 0.1
    assert RunConfig().federation.proximal_mu == 0.0


def _record() -> RoundRecord:
    return RoundRecord(1, [], [], [], 0.5, 0.7, 0.7, "sha", 1.0, 0.0)


def _manifest(config: RunConfig) -> dict:
    """The round manifest the round loop writes: what the run's strategy sent."""
    strategy = make_strategy(config.federation, config.secure_aggregation)
    return manifest(config, "fp", _record(), strategy.manifest_settings())


def test_manifest_records_the_mu_fedprox_sends():
    config = RunConfig.from_mapping(
        {"federation": {"strategy": "fedprox", "proximal-mu": 0.25}}
    )
    assert _manifest(config)["proximal_mu"] == 0.25


def test_manifest_records_zero_for_fedavg_whatever_the_config_holds():
    # A config that skipped validation (e.g. built in code) must not make the
    # manifest claim a mu FedAvg never sends.
    config = RunConfig()
    federation = config.federation.model_copy(update={"proximal_mu": 0.3})
    config = config.model_copy(update={"federation": federation})
    assert config.federation.strategy is Strategy.FEDAVG
    assert _manifest(config)["proximal_mu"] == 0.0


class _Stop(Exception):
    pass


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("federation", "expected"),
    [({"strategy": "fedprox", "proximal_mu": 0.25}, 0.25), ({}, 0.0)],
)
def test_site_trains_with_its_approved_mu_not_the_messages(
    synthetic_sites, tiny_config, monkeypatch, federation, expected
):
    config = tiny_config.with_overrides(
        data={"sites_dir": str(synthetic_sites)},
        federation=federation,
        secure_aggregation={"enabled": False},
        privacy={"enabled": False},
    )
    built = build_model(config)
    context = Context(
        run_id=1,
        node_id=11,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=config.to_flower(),
    )
    message = Message(
        content=RecordDict(
            {
                wire.GLOBAL_ADAPTER: to_record(adapter_state(built.model)),
                wire.CONFIG: ConfigRecord(
                    {
                        wire.SERVER_ROUND: 1,
                        wire.BASE_FINGERPRINT: built.base_fingerprint,
                        **wire_header(adapter_state(built.model)),
                        wire.RUN_ID: "mu-run",
                        wire.PROXIMAL_MU: 9.0,  # the coordinator's claim
                    }
                ),
            }
        ),
        dst_node_id=11,
        message_type=MessageType.TRAIN,
    )
    seen = []

    def capture(model, dataset, spec, *args, **kwargs):
        seen.append(spec.proximal_mu)
        raise _Stop

    monkeypatch.setattr(trainer, "train_local", capture)
    with pytest.raises(_Stop):
        handle_train(message, context)
    assert seen == [expected]
