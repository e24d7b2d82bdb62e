"""Helpers shared by the site-wait tests: a local grid of real site apps, late sites."""

from wardround.client.app import build_client_app
from wardround.simulations.local_grid import LocalGrid

FAST = {"join_timeout_s": 0.2, "round_timeout_s": 30.0}


def local_grid(config, sites=2, vanish=None):
    nodes = {
        1000 + i: {"partition-id": i, "num-partitions": sites} for i in range(sites)
    }
    run_config = config.to_flower()
    apps = {node: build_client_app(run_config) for node in nodes}
    return LocalGrid(apps, nodes, run_config, vanish=vanish)


def late(grid, present, calls):
    """Make ``grid`` report only ``present`` nodes for its first ``calls`` asks."""
    real = grid.get_node_ids
    asked = {"n": 0}

    def get_node_ids():
        asked["n"] += 1
        nodes = list(real())
        return nodes[:present] if asked["n"] <= calls else nodes

    grid.get_node_ids = get_node_ids
    return asked


class FakeLog:
    """Stands for the AuditLog: keeps (event, fields)."""

    def __init__(self):
        self.lines = []

    def record(self, event, **fields):
        self.lines.append((event, fields))
