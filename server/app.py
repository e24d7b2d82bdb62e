"""The coordinator's Flower ``ServerApp``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..common.config import RunConfig
from .federation import RoundObserver, run_federation

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
    from ..simulations.synth import synthesize_federation

    log.info("writing %d synthetic sites to %s", config.data.synthesize_sites, root)
    synthesize_federation(
        root,
        config.data.synthesize_sites,
        patients_per_site=config.data.patients_per_site,
        seed=config.data.synth_seed,
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
        result = run_federation(
            grid,
            config,
            run_dir=Path(config.output.dir),
            site_names=site_namer(config),
            observer=observer,
        )
        if results is not None:
            results.append(result)

    return server_app


app = build_server_app()
