"""Only sites enrolled with ``wardround sites add`` are sampled into a deployed run.

A node registered at the SuperLink by any other path (e.g. ``flwr supernode
register`` on the coordinator's internal port) connects, but the ServerApp never
samples it, never sends it a message, and the coordinator's audit log records it.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from grid_helpers import StubGrid

from wardround.common.config import FederationConfig
from wardround.common.errors import FederationError
from wardround.ops.audit import AuditLog, read_audit
from wardround.server.deployment import SiteRoster
from wardround.server.enrolled_grid import EnrolledGrid
from wardround.server.registry import EnrolledSite, save_sites
from wardround.server.site_wait import SiteWait
from wardround.server.strategies import make_strategy

ENROLLED = {"site-01": 101, "site-02": 102, "site-03": 103}
pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a run

INTRUDER = 666  # registered at the SuperLink behind the registry's back
REVOKED = 104


class ConnectedGrid(StubGrid):
    """A fixed set of connected nodes; records what is pushed to them."""

    def __init__(self, nodes: list[int]) -> None:
        super().__init__(nodes)
        self.pushed: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.pushed.extend(messages)
        return [str(i) for i, _ in enumerate(messages)]

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        self.push_messages(messages)
        return []


def _site(name: str, node: int, revoked: bool = False) -> EnrolledSite:
    return EnrolledSite(
        name=name,
        node_id=node,
        public_key_sha256="0" * 64,
        enrolled_at="2026-01-01T00:00:00+00:00",
        revoked_at="2026-01-02T00:00:00+00:00" if revoked else None,
    )


@pytest.fixture
def deployed(tmp_path):
    sites = {name: _site(name, node) for name, node in ENROLLED.items()}
    sites["site-04"] = _site("site-04", REVOKED, revoked=True)
    save_sites(tmp_path / "sites.json", sites)
    inner = ConnectedGrid([*ENROLLED.values(), INTRUDER, REVOKED])
    audit = AuditLog(tmp_path / "audit.jsonl", actor="coordinator")
    grid = EnrolledGrid(inner, SiteRoster(tmp_path / "sites.json"), audit, "run-a")
    return grid, inner, tmp_path / "audit.jsonl"


def test_a_node_registered_behind_the_registrys_back_is_never_sampled(deployed):
    grid, inner, audit_path = deployed
    strategy = make_strategy(FederationConfig(min_sites=2, fraction_train=1.0))

    for server_round in (1, 2, 3):
        messages = list(
            strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        )
        sampled = {m.metadata.dst_node_id for m in messages}
        assert sampled == set(ENROLLED.values())
    assert set(grid.get_node_ids()) == set(ENROLLED.values())

    ignored = [e for e in read_audit(audit_path) if e["event"] == "node_ignored"]
    assert sorted(e["node_id"] for e in ignored) == sorted(
        [str(INTRUDER), str(REVOKED)]
    )
    assert all(e["run_id"] == "run-a" for e in ignored)  # once per node and run


def test_the_join_wait_counts_only_enrolled_sites(deployed):
    grid, inner, _ = deployed
    inner.nodes = [ENROLLED["site-01"], INTRUDER]
    wait = SiteWait(
        grid=grid,
        expected=3,
        min_sites=2,
        join_timeout_s=0.0,
        on_paused=lambda reason: None,
        on_resumed=lambda: None,
    )
    assert wait._connected() == [ENROLLED["site-01"]]  # the intruder is no quorum


def test_a_message_to_a_node_that_is_not_enrolled_is_refused(deployed):
    grid, inner, _ = deployed
    to_intruder = Message(RecordDict(), dst_node_id=INTRUDER, message_type="train")
    with pytest.raises(FederationError, match=str(INTRUDER)):
        grid.push_messages([to_intruder])
    with pytest.raises(FederationError, match=str(INTRUDER)):
        grid.send_and_receive([to_intruder])
    assert inner.pushed == []
    to_site = Message(RecordDict(), dst_node_id=101, message_type="train")
    assert list(grid.push_messages([to_site])) == ["0"]


def test_a_site_enrolled_during_the_run_is_sampled_from_then_on(deployed, tmp_path):
    grid, inner, _ = deployed
    inner.nodes.append(105)
    assert 105 not in set(grid.get_node_ids())
    sites = {name: _site(name, node) for name, node in ENROLLED.items()}
    sites["site-05"] = _site("site-05", 105)
    save_sites(tmp_path / "sites.json", sites)
    assert 105 in set(grid.get_node_ids())
