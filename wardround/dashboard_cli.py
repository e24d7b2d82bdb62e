"""``wardround dashboard``: serve a dashboard without a daemon.

Over a run directory (or a folder of them), a coordinator's state folder
(``--coordinator``) or a site (``--site``). Read-only, 127.0.0.1 by default.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from wardround.cli_support import user_errors


@user_errors
def dashboard_command(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="a run directory, or a folder of run directories",
            show_default=False,
        ),
    ] = None,
    coordinator: Annotated[
        Path | None,
        typer.Option(
            "--coordinator",
            help="coordinator.toml: its runs, sites and audit log",
            dir_okay=False,
        ),
    ] = None,
    site: Annotated[
        Path | None,
        typer.Option(
            "--site", help="site.toml: the site operator's view", dir_okay=False
        ),
    ] = None,
    audit: Annotated[
        list[Path] | None,
        typer.Option("--audit", help="audit logs to show, merged (repeat)"),
    ] = None,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port")] = 9095,
    token_file: Annotated[
        Path | None,
        typer.Option(help="file (0600) with the token every request must give"),
    ] = None,
    certificate: Annotated[
        Path | None, typer.Option(help="TLS certificate (required off loopback)")
    ] = None,
    private_key: Annotated[
        Path | None, typer.Option(help="its private key (required off loopback)")
    ] = None,
    refresh: Annotated[
        int, typer.Option(min=0, help="live pages reload every N seconds (0: never)")
    ] = 5,
) -> None:
    """Serve the read-only web dashboard and /metrics until Ctrl-C."""
    from wardround.common.errors import ConfigError
    from wardround.dashboard.web import DashboardServer, check_exposure

    chosen = [p for p in (path, coordinator, site) if p is not None]
    if len(chosen) != 1:
        raise ConfigError(
            "give one of: a run directory, --coordinator coordinator.toml, "
            "--site site.toml",
            hint="For example `wardround dashboard runs/simulate`.",
        )
    exposure = check_exposure(
        "wardround dashboard",
        host,
        port,
        token_file=token_file,
        certfile=certificate,
        keyfile=private_key,
    )
    app, what = _app(path, coordinator, site, audit or [], exposure, refresh)
    server = DashboardServer(app, exposure, what)
    server.start()
    typer.echo(f"{what} dashboard on {exposure.url} (read-only); Ctrl-C stops it")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5) and server.thread.is_alive():
        pass
    server.stop()


def _app(
    path: Path | None,
    coordinator: Path | None,
    site: Path | None,
    audit: list[Path],
    exposure: Any,
    refresh: int,
) -> tuple[Any, str]:
    from wardround.common.errors import ConfigError

    if site is not None:
        from wardround.client.dashboard.app import build_app as site_app
        from wardround.client.dashboard.state import SiteSource
        from wardround.sitedata.site_config import SiteConfig

        config = SiteConfig.from_toml(site)
        report: dict[str, Any] = {}

        def check() -> dict[str, Any]:
            if not report:
                from wardround.client.site_check import check_site
                from wardround.common.config import RunConfig

                report.update(check_site(site, RunConfig().task))
            return report

        source = SiteSource(site=config, check=check)
        return site_app(source, exposure, refresh_s=refresh), f"site {config.site.name}"

    from wardround.server.dashboard.app import build_app, coordinator_source
    from wardround.server.dashboard.state import CoordinatorSource, is_run_dir

    if coordinator is not None:
        from wardround.server.coordinator_config import CoordinatorConfig

        running = coordinator_source(CoordinatorConfig.from_toml(coordinator))
        running.audit_paths = (*running.audit_paths, *audit)
        return build_app(running, exposure, refresh_s=refresh), "coordinator"
    assert path is not None
    if not path.is_dir():
        raise ConfigError(
            f"{path} is not a folder",
            hint="Give a run directory (it holds rounds.jsonl or run.json), or the "
            "folder of run directories.",
        )
    runs: CoordinatorSource
    if is_run_dir(path):
        runs = CoordinatorSource(single_run=path, audit_paths=tuple(audit))
    elif any(is_run_dir(p) for p in path.iterdir() if p.is_dir()):
        runs = CoordinatorSource(runs_root=path, audit_paths=tuple(audit))
    else:
        raise ConfigError(
            f"{path} is not a run directory and holds none",
            hint="A run directory holds rounds.jsonl or run.json "
            "(`wardround simulate --out DIR` writes one).",
        )
    return build_app(runs, exposure, refresh_s=refresh), "run"
