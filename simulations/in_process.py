"""One federation run in this process: the real round loop and the real ClientApps.

What the study's federated arms and the benchmarks run: wardround's round loop
(:func:`~wardround.server.federation.run_federation`, what the ServerApp runs)
against every site's real ClientApp (local training, FedProx term, DP-SGD, SecAgg+
mod, egress guard) on an in-process :class:`~.local_grid.LocalGrid`. Every message
goes through Flower's protobuf encoding, and no Ray cluster starts, so a run costs
its training and nothing else. ``wardround simulate`` runs the same apps in Flower's
simulation engine instead (:mod:`.runner`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..common.config import RunConfig
    from ..server.federation import FederationResult, RoundObserver
    from .local_grid import LocalGrid

FIRST_NODE = 1000
"""Node id of the first site; site ``i`` is node ``FIRST_NODE + i``."""


def site_count(config: RunConfig) -> int:
    """How many sites ``data.sites-dir`` holds (a folder with a site.toml each)."""
    if not config.data.sites_dir:
        return 0
    return len(list(Path(config.data.sites_dir).glob("*/site.toml")))


def in_process_grid(config: RunConfig, n_sites: int) -> LocalGrid:
    """A grid to ``n_sites`` ClientApps built from ``config``, in this process.

    Site ``i`` is partition ``i`` of ``n_sites``: the ClientApp loads the i-th
    site folder of ``data.sites-dir``, as it does in ``wardround simulate``.
    """
    from ..client.app import build_client_app
    from .local_grid import LocalGrid

    nodes = {
        FIRST_NODE + i: {"partition-id": i, "num-partitions": n_sites}
        for i in range(n_sites)
    }
    flat = config.to_flower()
    return LocalGrid({node: build_client_app(flat) for node in nodes}, nodes, flat)


def run_in_process(
    config: RunConfig,
    run_dir: Path,
    *,
    n_sites: int | None = None,
    observer: RoundObserver | None = None,
) -> FederationResult:
    """Run ``config``'s federation over the sites of ``data.sites-dir``, here.

    ``n_sites`` defaults to every site in ``data.sites-dir``; sites are named by
    their folders, as in ``wardround simulate``. Raises what
    :func:`~wardround.server.federation.run_federation` raises when a round cannot
    complete (the run directory keeps the completed rounds).
    """
    from ..server.app import site_namer
    from ..server.federation import run_federation

    grid = in_process_grid(config, site_count(config) if n_sites is None else n_sites)
    return run_federation(
        grid,
        config,
        run_dir=Path(run_dir),
        site_names=site_namer(config),
        observer=observer,
    )
