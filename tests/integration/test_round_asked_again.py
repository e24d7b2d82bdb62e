"""A round asked again after a deployed site died while training it.

Three deployed sites (each SuperNode names its ``site.toml``: answers are counted,
DP releases charged, answers in the clear kept) answer wardround's coordinator on
an in-process grid, with DP in the clear and min-sites = 3. One site dies in the
middle of round 1's training: it has counted the answer and reserved the round's
epsilon, and nothing left. The round falls short and is asked again once the site
is back. The two others send their kept answers again; the one that died trains
the round anew, one more answer and one more release. With a spare
(``repeatable-rounds = 1``) the run reaches its last round within its epsilon;
without one, that site refuses the last round and the run stops there.
"""

from __future__ import annotations

import pytest

import wardround.client.trainer as trainer
from wardround.client.answers import ANSWER_LOG, AnswerLog
from wardround.client.app import build_client_app
from wardround.client.ledger import site_ledger
from wardround.common.errors import PrivacyPolicyRefused
from wardround.ops.audit import AUDIT_FILENAME, read_audit
from wardround.server.federation import run_federation
from wardround.simulations.local_grid import LocalGrid

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("task_identity")]

NODES = (3000, 3001, 3002)
DYING = 3002


class _SiteDied(BaseException):
    """The site's process ends mid-training (not an error it could report)."""


@pytest.fixture
def sites(clean_three_sites):
    return clean_three_sites


def _grid(config, folders, monkeypatch):
    """Deployed sites; ``DYING`` dies once, inside its first training."""
    grid = LocalGrid(
        {node: build_client_app() for node in NODES},
        {
            node: {"site-config": str(folder / "site.toml")}
            for node, folder in zip(NODES, folders, strict=True)
        },
        config.to_flower(),
    )
    real_train = trainer.train_local
    training = {"node": 0, "died": False}

    def train_local(*args, **kwargs):
        if training["node"] == DYING and not training["died"]:
            training["died"] = True
            raise _SiteDied
        return real_train(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_local", train_local)

    def dies_mid_training(node, msg):
        """Run the site's app; the site vanishes if it died in it."""
        if node != DYING or msg.metadata.message_type != "train" or training["died"]:
            return False
        training["node"] = node
        try:
            grid._apps[node](msg, grid._contexts[node])
        except _SiteDied:
            return True  # no reply: the process is gone
        finally:
            training["node"] = 0
        return False  # pragma: no cover - it always dies on its first training

    grid._vanish = dies_mid_training
    real_nodes = grid.get_node_ids

    def get_node_ids():
        grid.dead.clear()  # the site's daemon restarted it
        return real_nodes()

    grid.get_node_ids = get_node_ids
    return grid


def _replayed(folder) -> list[int]:
    """The rounds whose training answer the site sent again."""
    return [
        e["round"]
        for e in read_audit(folder / ".wardround-site" / AUDIT_FILENAME)
        if e["event"] == "answer_replayed" and e["message_type"] == "train"
    ]


def _trained_rounds(folder) -> list[int]:
    answers = AnswerLog(folder / "privacy-ledger" / ANSWER_LOG).entries()
    return [e["round"] for e in answers if e["kind"] == "train"]


@pytest.mark.parametrize("spare", [1, 0])
def test_a_site_that_died_mid_training_answers_the_round_asked_again_anew(
    sites, tiny_config, tmp_path, monkeypatch, spare
):
    config = tiny_config.with_overrides(
        train={"max_steps": 1},
        federation={"rounds": 2, "min_sites": 3, "repeatable_rounds": spare},
        secure_aggregation={"enabled": False},
    )
    assert config.privacy.enabled
    grid = _grid(config, sites, monkeypatch)
    run_dir = tmp_path / "run"
    dying = sites[NODES.index(DYING)]
    others = [f for f in sites if f != dying]

    if spare:
        result = run_federation(grid, config, run_dir=run_dir)
        assert [r.round for r in result.rounds] == [0, 1, 2]
        assert len(result.rounds[1].train) == len(result.rounds[2].train) == 3
    else:
        with pytest.raises(PrivacyPolicyRefused) as stopped:
            run_federation(grid, config, run_dir=run_dir)
        assert stopped.value.message.startswith("round 2: 2 site(s) trained")
        assert "node 3002: [AnswerRefused]" in stopped.value.message

    # round 1 was asked again: the site that died had trained nothing that left
    rounds = (run_dir / "rounds.jsonl").read_text().splitlines()
    assert '"asked_again"' in rounds[1]
    # the others sent their kept answers again: each round trained once
    assert all(_trained_rounds(f) == [1, 2] for f in others)
    assert all(_replayed(f) == [1] for f in others)
    ledger = site_ledger(dying / "privacy-ledger")
    if spare:
        # the died round counted: one more answer and one more release, covered
        assert _trained_rounds(dying) == [1, 1, 2]
        # three releases counted (the uncommitted one with its planned steps),
        # all within the run's epsilon, which was planned for them
        assert [run for run, _ in ledger.recorded()] == [ledger.recorded()[0][0]] * 3
        spent = ledger.epsilon(
            config.privacy.target_delta,
            config.privacy.accountant,
            ledger.recorded()[0][0],
        )
        two = others[0]
        spent_by_a_site_that_replayed = site_ledger(two / "privacy-ledger").epsilon(
            config.privacy.target_delta,
            config.privacy.accountant,
            ledger.recorded()[0][0],
        )
        assert spent_by_a_site_that_replayed < spent
        assert spent <= config.privacy.target_epsilon * (1 + 1e-6)
    else:
        # without a spare the last round is refused: the run stops, not hangs
        assert _trained_rounds(dying) == [1, 1]
