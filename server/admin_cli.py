"""The coordinator admin's commands: ``coordinator start``, ``sites``, ``launch``, ``runs``, ``stop``.

Registered by ``wardround/cli.py``. Heavy imports happen inside the commands, so
``--help`` stays fast.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from wardround.cli_support import (
    CoordinatorOption,
    JsonOption,
    command_group,
    user_errors,
)

from ..common.config import personalised_in
from ..ops.config_file import load_run_config

coordinator_app = command_group(
    "coordinator",
    help="Run the coordinator (a Flower SuperLink with TLS and site authentication).",
)
sites_app = command_group(
    "sites",
    help="Enrol, list and revoke the sites allowed to connect.",
)


def _load(path: Path) -> Any:
    from .coordinator_config import CoordinatorConfig

    return CoordinatorConfig.from_toml(path)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@coordinator_app.command("start")
@user_errors
def coordinator_start(config: CoordinatorOption) -> None:
    """Run the coordinator (SuperLink, nginx) until SIGTERM; resume unfinished runs."""
    from .coordinator import run_coordinator

    coordinator = _load(config)
    stop = threading.Event()
    _stop_on_signals(stop)
    typer.echo(f"coordinator: starting; state in {coordinator.state_path}")

    def announce() -> None:
        # only once it serves: a refused start (TLS, lock, port) names no address
        typer.echo(
            f"coordinator: sites on {coordinator.coordinator.host}:"
            f"{coordinator.coordinator.port} (TLS, Fleet API only, site "
            f"authentication); admin on {coordinator.internal_address}"
        )
        if coordinator.dashboard.enabled:
            from .dashboard.app import coordinator_exposure

            typer.echo(
                f"coordinator: dashboard and /metrics on "
                f"{coordinator_exposure(coordinator).url} (read-only)"
            )
        typer.echo("coordinator: ready")

    run_coordinator(coordinator, stop, on_ready=announce)
    typer.echo("coordinator: stopped")


@sites_app.command("add")
@user_errors
def sites_add(
    name: Annotated[str, typer.Argument(help="the site's name, e.g. site-01")],
    key: Annotated[
        Path, typer.Option("--key", help="the site's NAME.pub", dir_okay=False)
    ],
    config: CoordinatorOption,
) -> None:
    """Enrol a site's public key; its SuperNode may connect from now on."""
    from .registry import add_site

    site = add_site(_load(config), name, key)
    typer.echo(
        f"enrolled {site.name} as node {site.node_id} (key sha256 {site.public_key_sha256[:16]}…)"
    )


@sites_app.command("revoke")
@user_errors
def sites_revoke(
    name: Annotated[str, typer.Argument(help="the site's name")],
    config: CoordinatorOption,
) -> None:
    """Revoke a site: its key is refused from now on."""
    from .registry import revoke_site

    site = revoke_site(_load(config), name)
    typer.echo(f"revoked {site.name} (node {site.node_id}) at {site.revoked_at}")


@sites_app.command("list")
@user_errors
def sites_list(config: CoordinatorOption, as_json: JsonOption = False) -> None:
    """The enrolled sites and whether each is online."""
    from .registry import list_sites

    rows = list_sites(_load(config))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from .admin_table import print_admin_table

    print_admin_table(
        rows,
        ["site", "node_id", "state", "online_at", "enrolled_at", "revoked_at"],
        identifiers={"site", "node_id"},
        times={"online_at", "enrolled_at", "revoked_at"},
    )


@user_errors
def launch(
    config: Annotated[Path, typer.Option("--config", help="run.toml", dir_okay=False)],
    coordinator: Annotated[
        Path,
        typer.Option(
            "--coordinator",
            envvar="WARDROUND_COORDINATOR_CONFIG",
            help="coordinator.toml (or $WARDROUND_COORDINATOR_CONFIG)",
            dir_okay=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="copy the run directory here (default runs/NAME)"),
    ] = None,
    print_hash: Annotated[
        bool,
        typer.Option("--print-hash", help="print the app hash sites approve, and exit"),
    ] = False,
    detach: Annotated[
        bool, typer.Option("--detach", help="start the run and return")
    ] = False,
) -> None:
    """Start a run on the deployed federation and follow it round by round."""
    from wardround.common.errors import FederationError

    from ..ops.file_lock import in_use
    from .launcher import build_app, check_copy_target, launch_run, site_count_warnings

    run = load_run_config(config)
    coord = _load(coordinator)
    if print_hash:
        typer.echo(build_app(run, coord.state_path / "apps").fab_hash)
        return
    if not detach:
        # before the run starts, not after its last round; the default runs/NAME
        # from the coordinator's state folder is the run directory itself
        default_here = Path("runs").resolve() == (coord.state_path / "runs").resolve()
        if out is not None or not default_here:
            check_copy_target(out or Path("runs") / "NAME", None, coord.state_path)
    if not in_use(coord.state_path):
        raise FederationError(
            f"the coordinator is not running: no process holds {coord.state_path} "
            "(or it runs with another state-dir)",
            hint=f"Start it (`wardround coordinator start --config {coordinator}`, "
            "or `systemctl start wardround-coordinator`), then launch again.",
        )
    for warning in site_count_warnings(coord, run):
        typer.echo(f"warning: {warning}", err=True)
    name, run_dir, bundle = launch_run(coord, run, config)
    typer.echo(f"run {name} started; app hash {bundle.fab_hash}")
    typer.echo(
        "sites train it only once approved: send them run.toml; each runs "
        "`wardround site approve --run-config run.toml --config site.toml` and "
        f"checks the hash is {bundle.fab_hash}. An approval is for one launch: "
        "a run launched again (after a failure) needs a changed run.toml and new "
        "approvals."
    )
    if detach:
        typer.echo(f"follow it with: wardround runs {name} --follow")
        return
    _follow_and_copy(coord, run_dir, out or Path("runs") / name, run.federation.rounds)


def _follow_and_copy(coord: Any, run_dir: Path, out: Path, rounds: int) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from wardround.common.errors import ConfigError, FederationError

    from .launcher import copy_run, follow

    console = Console(stderr=True)
    shown: dict[str, Any] = {"state": None, "round": 0}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("round {task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("starting", total=rounds)

        def on_progress(status: dict[str, Any]) -> None:
            state = status.get("state", "starting")
            progress.update(
                task, completed=status.get("rounds_done", 0), description=state
            )
            if state != shown["state"]:
                shown["state"] = state
                reason = f": {status['reason']}" if status.get("reason") else ""
                typer.echo(f"{state}{reason}", err=True)
            done = int(status.get("rounds_done") or 0)
            if done > shown["round"] and not console.is_terminal:
                # without a terminal there is no progress bar: one line per round
                shown["round"] = done
                of = f"/{rounds}" if rounds else ""
                typer.echo(f"round {done}{of} done", err=True)

        try:
            result = follow(coord, run_dir, on_progress)
        except KeyboardInterrupt:
            typer.echo(
                f"stopped following; the run continues. `wardround runs {run_dir.name} "
                f"--follow` follows it again, `wardround stop {run_dir.name}` stops it.",
                err=True,
            )
            raise typer.Exit(130) from None
    try:
        copied = copy_run(run_dir, out, coord.state_path)
    except ConfigError as refused:  # the folder changed while the run ran
        refused.hint = f"The run is in {run_dir}; copy it from there."
        raise
    except OSError as failed:
        raise ConfigError(
            f"could not copy the run to {out}: {failed}",
            hint=f"The run is in {run_dir}; copy it from there.",
        ) from None
    typer.echo(f"run directory: {copied}")
    summary = copied / "run.json"
    if summary.exists():
        report = json.loads(summary.read_text())
        final = report.get("final", {})
        auroc = (
            final.get("global", {}).get("auroc_macro")
            if isinstance(final, dict)
            else None
        )
        # each site evaluates a model of its own: no one global model is scored
        scored = (
            "AUROC of the sites' personalised models"
            if personalised_in(report.get("config", {}).get("federation", {}))
            else "global AUROC"
        )
        if auroc is not None and result.status.get("rounds_done"):
            typer.echo(f"final {scored} {auroc:.3f}")
        elif auroc is not None:
            typer.echo(
                f"no round completed: the adapter in {copied} is the untrained one "
                f"({scored} {auroc:.3f})"
            )
    if result.state != "finished":
        raise FederationError(
            f"run {run_dir.name} {result.state}: {result.reason or 'no reason given'}",
            hint=f"Completed rounds are in {copied}; `wardround audit` shows what happened.",
        )


@user_errors
def runs(
    name: Annotated[str | None, typer.Argument(help="one run (name or prefix)")] = None,
    coordinator: Annotated[
        Path,
        typer.Option(
            "--coordinator",
            envvar="WARDROUND_COORDINATOR_CONFIG",
            help="coordinator.toml (or $WARDROUND_COORDINATOR_CONFIG)",
            dir_okay=False,
        ),
    ] = Path("coordinator.toml"),
    follow_run: Annotated[
        bool, typer.Option("--follow", help="follow the run until it ends")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="with --follow: copy it here")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List the coordinator's runs, or show (and follow) one."""
    from .launcher import (
        check_copy_target,
        find_run,
        list_runs,
        read_json,
        run_status,
    )

    coord = _load(coordinator)
    if name is None:
        rows = list_runs(coord)
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            from .admin_table import print_admin_table

            print_admin_table(
                rows,
                ["name", "state", "round", "rounds", "reason", "launched_at"],
                identifiers={"name"},
                free_text={"reason"},
                times={"launched_at"},
                where_in_full="a reason cut short: `wardround runs NAME` shows it",
            )
        return
    run_dir = find_run(coord, name)
    if follow_run:
        check_copy_target(out or Path("runs") / run_dir.name, run_dir, coord.state_path)
        total = run_status(run_dir).get("rounds") or 0
        _follow_and_copy(coord, run_dir, out or Path("runs") / run_dir.name, total)
        return
    detail = {**read_json(run_dir / "launch.json"), "status": run_status(run_dir)}
    typer.echo(json.dumps(detail, indent=2))


@user_errors
def stop(
    name: Annotated[str, typer.Argument(help="the run's name (or a unique prefix)")],
    coordinator: Annotated[
        Path,
        typer.Option(
            "--coordinator",
            envvar="WARDROUND_COORDINATOR_CONFIG",
            help="coordinator.toml (or $WARDROUND_COORDINATOR_CONFIG)",
            dir_okay=False,
        ),
    ] = Path("coordinator.toml"),
) -> None:
    """Stop a run; its completed rounds stay in its run directory."""
    from .launcher import stop_run

    run_dir = stop_run(_load(coordinator), name)
    typer.echo(f"stopped {run_dir.name}; its completed rounds are in {run_dir}")
