"""A site's own model (federation.own-model-weight) against what a coordinator can
send: it starts from the adapter the site built, moves only with an answer that
passed the egress guard, and one that gives NaN or infinite outputs is left out of
the evaluation and started again."""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from safetensors.numpy import load_file, save_file

from wardround.client.app import handle_evaluate, handle_train
from wardround.common import wire
from wardround.common.adapter import adapter_state, to_record, wire_header
from wardround.common.errors import EgressViolation
from wardround.models import build_model

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def site(synthetic_sites, tiny_config):
    config = tiny_config.with_overrides(
        data={"sites_dir": str(synthetic_sites)},
        train={"max_steps": 2},
        secure_aggregation={"enabled": False},
        privacy={"enabled": False},
        federation={"own_model_weight": 0.5},
    )
    built = build_model(config)
    return config, built, synthetic_sites / "site-01" / ".wardround-cache" / "personal"


def _context(config, run_id):
    return Context(
        run_id=run_id,
        node_id=11,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=config.to_flower(),
    )


def _message(built, state, kind, server_round=1):
    config = ConfigRecord(
        {
            wire.SERVER_ROUND: server_round,
            wire.BASE_FINGERPRINT: built.base_fingerprint,
            **wire_header(state),
            wire.RUN_ID: "own-model",
        }
    )
    return Message(
        content=RecordDict(
            {wire.GLOBAL_ADAPTER: to_record(state), wire.CONFIG: config}
        ),
        dst_node_id=11,
        message_type=kind,
    )


def _own_files(folder):
    return set(folder.glob("*.own.safetensors")) if folder.is_dir() else set()


def test_a_hostile_first_adapter_never_enters_the_sites_own_model(site):
    config, built, folder = site
    built_state = adapter_state(built.model)
    # finite, so the site trains on it and answers; far from anything trained
    hostile = {
        k: v * 1e4 if ".head." in k else v.copy() for k, v in built_state.items()
    }
    before = _own_files(folder)

    handle_train(_message(built, hostile, MessageType.TRAIN), _context(config, 801))

    (own_file,) = _own_files(folder) - before
    own = load_file(str(own_file))
    heads = [k for k in own if ".head." in k]
    assert heads and all(np.abs(own[k]).max() < 100 for k in heads)
    assert max(np.abs(hostile[k]).max() for k in heads) > 1000


def test_an_honest_first_round_is_the_own_models_first_round(site):
    config, built, folder = site
    built_state = adapter_state(built.model)
    before = _own_files(folder)

    handle_train(_message(built, built_state, MessageType.TRAIN), _context(config, 802))

    (own_file,) = _own_files(folder) - before
    own = load_file(str(own_file))
    # the round trained from the built adapter: its result is kept, not retrained
    assert any(not np.array_equal(own[k], built_state[k]) for k in own)


def test_a_refused_answer_does_not_move_the_own_model(site):
    config, built, folder = site
    rng = np.random.default_rng(1)
    # finite, and training on it gives an infinite loss: the guard refuses it
    diverging = {
        k: (rng.choice([-1.0, 1.0], v.shape) * 3e38).astype(v.dtype)
        if ".wide." in k
        else v.copy()
        for k, v in adapter_state(built.model).items()
    }
    before = _own_files(folder)

    with pytest.raises(EgressViolation):
        handle_train(
            _message(built, diverging, MessageType.TRAIN), _context(config, 803)
        )

    assert _own_files(folder) == before


def test_an_own_model_with_infinite_outputs_is_left_out_and_started_again(site, caplog):
    config, built, folder = site
    built_state = adapter_state(built.model)
    context = _context(config, 804)
    before = _own_files(folder)
    handle_train(_message(built, built_state, MessageType.TRAIN), context)
    (own_file,) = _own_files(folder) - before
    broken = {
        k: np.full_like(v, 3e38) if ".head." in k else v
        for k, v in load_file(str(own_file)).items()
    }
    save_file(broken, str(own_file))
    caplog.set_level(logging.WARNING, logger="wardround.client.app")

    reply = handle_evaluate(_message(built, built_state, MessageType.EVALUATE), context)

    metrics = dict(reply.content[wire.METRICS])
    assert np.isfinite(metrics[wire.AUROC_MACRO])
    assert "this evaluation is the global model's alone" in caplog.text
    assert not own_file.exists()


def test_a_failing_own_model_never_costs_the_rounds_answer(site, monkeypatch, caplog):
    from wardround.client import app

    config, built, folder = site

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app, "save_own_model", full_disk)
    caplog.set_level(logging.WARNING, logger="wardround.client.app")
    before = _own_files(folder)

    reply = handle_train(
        _message(built, adapter_state(built.model), MessageType.TRAIN),
        _context(config, 805),
    )

    assert wire.ADAPTER_DELTA in reply.content
    assert "the site's own model was not trained this round (OSError" in caplog.text
    assert _own_files(folder) == before
