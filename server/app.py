"""The coordinator's Flower ``ServerApp``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..common.config import RunConfig
from ..common.errors import ConfigError
from ..flower_compat.pacing import PACING_ENV, bound_serverapp_pulls
from ..flower_compat.prompt_grid import FLOWER_REPLY_POLL_S, PromptGrid
from .deployment import deployment_from_env
from .enrolled_grid import EnrolledGrid
from .federation import run_federation
from .observers import ObserverGroup, RoundObserver

log = logging.getLogger(__name__)


def site_namer(config: RunConfig) -> Callable[[int, int], str]:
    """Name sites by their folder under ``data.sites-dir`` (simulation) or node id."""
    folders = (
        sorted(p.parent.name for p in Path(config.data.sites_dir).glob("*/site.toml"))
        if config.data.sites_dir
        else []
    )

    def name(node_id: int, index: int) -> str:
        if 0 <= index < len(folders):
            return folders[index]
        return f"node-{node_id}"

    return name


def prepare_sites(config: RunConfig) -> None:
    """Write synthetic sites into ``data.sites-dir`` when the config asks and none exist."""
    if not config.data.synthesize_sites or not config.data.sites_dir:
        return
    root = Path(config.data.sites_dir)
    if any(root.glob("*/site.toml")):
        return
    # `flwr run .` on synthetic hospitals: only this path imports the generator, so
    # a deployed ServerApp never loads it.
    from ..synthetic.hospitals import synthesize_federation

    log.info("writing %d synthetic sites to %s", config.data.synthesize_sites, root)
    synthesize_federation(
        root,
        config.data.synthesize_sites,
        patients_per_site=config.data.patients_per_site,
        seed=config.data.synth_seed,
    )


def check_simulated_nodes(nodes: int, config: RunConfig) -> None:
    """A simulation with fewer SuperNodes than min-sites would wait for ever."""
    if 0 < nodes < config.federation.min_sites:
        raise ConfigError(
            f"the simulation has {nodes} SuperNode(s) and the run needs "
            f"federation.min-sites={config.federation.min_sites}",
            hint="Give the federation one SuperNode per site, e.g. `flwr federation "
            f"simulation-config @none/default local --num-supernodes "
            f"{config.federation.min_sites}`, or lower federation.min-sites (at "
            "least 3 with secure aggregation).",
        )


def build_server_app(
    run_config: dict[str, Any] | None = None,
    observer: RoundObserver | None = None,
    results: list[Any] | None = None,
) -> ServerApp:
    """A ServerApp; ``run_config`` overrides the context's (in-process simulation)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        config = RunConfig.from_flower(
            run_config if run_config is not None else dict(context.run_config)
        )
        prepare_sites(config)
        # On a coordinator: enrolled sites' names, who to wait for, the audit log.
        deployment = deployment_from_env()
        if deployment is None:
            check_simulated_nodes(len(list(grid.get_node_ids())), config)
            options: dict[str, Any] = {"site_names": site_namer(config)}
        else:
            # Only sites enrolled with `wardround sites add` are ever sampled.
            grid = EnrolledGrid(
                grid,
                deployment.roster,
                deployment.observer.recorder,
                deployment.run_id(config),
            )
            # Flower's Grid polls for replies every 3 s and may fetch a dead site's
            # arrays past the round's timeout: PromptGrid keeps the deadline.
            paced = os.environ.get(PACING_ENV, "1") != "0"
            if not bound_serverapp_pulls(prompt=paced):
                log.warning(
                    "this Flower's Grid does not fetch reply arrays as Flower 1.41 "
                    "did: a site that dies mid-upload may stall its round past "
                    "federation.round-timeout-s (flower_compat/pacing.py)"
                )
            grid = PromptGrid(grid, poll_s=0.1 if paced else FLOWER_REPLY_POLL_S)
            options = {
                "site_names": deployment.roster.name,
                "run_id": deployment.run_id(config),
                "expected_nodes": deployment.roster.expected_nodes(),
            }
        # Only a deployment's sites go away and come back (server/retries.py).
        options["asks_again"] = deployment is not None
        result = run_federation(
            grid,
            config,
            run_dir=Path(config.output.dir),
            observer=ObserverGroup(
                observer, deployment.observer if deployment else None
            ),
            **options,
        )
        if results is not None:
            results.append(result)

    return server_app


app = build_server_app()
