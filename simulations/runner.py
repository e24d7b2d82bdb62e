"""``wardround simulate``: a whole federation on one machine, in Flower's simulation engine.

Makes synthetic hospitals unless given data, runs the ServerApp and one ClientApp
per site through ``flwr.simulation.run_simulation`` (Ray backend), and writes the
run directory. Every process it starts (Ray's) is stopped by PID on the way out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common.config import RunConfig
from ..common.errors import ConfigError, FederationError
from ..common.secagg_math import MIN_PARTICIPANTS
from ..ops.env import apply_machine_hygiene
from ..ops.processes import ChildProcessGuard
from ..server.federation import FederationResult, RoundObserver

log = logging.getLogger(__name__)

SYNTH_RECORD = "synth.json"


def prepare_simulation(
    config: RunConfig, *, out_dir: Path, sites: int | None, rounds: int | None
) -> tuple[RunConfig, int]:
    """Resolve paths, write synthetic sites if needed; return the final config and site count."""
    out_dir = Path(out_dir).resolve()
    overrides: dict[str, dict] = {"output": {"dir": str(out_dir)}}
    if rounds is not None:
        overrides["federation"] = {"rounds": rounds}
    sites_dir = Path(config.data.sites_dir).resolve() if config.data.sites_dir else None
    if sites_dir is None:
        n_sites = sites if sites is not None else (config.data.synthesize_sites or 3)
        _require_secure_aggregation_sites(config, n_sites)
        sites_dir = out_dir / "sites"
        synthetic_sites(
            sites_dir, n_sites, config.data.patients_per_site, config.data.synth_seed
        )
    elif not sites_dir.is_dir():
        raise ConfigError(
            f"data.sites-dir {sites_dir} does not exist",
            hint="Point data.sites-dir at a folder of site folders, each with a site.toml.",
        )
    found = sorted(sites_dir.glob("*/site.toml"))
    if sites is not None and config.data.sites_dir and sites != len(found):
        raise ConfigError(
            f"--sites {sites} but data.sites-dir holds {len(found)} site(s)",
            hint="Drop --sites to use them all.",
        )
    if not found:
        raise ConfigError(
            f"no */site.toml under {sites_dir}",
            hint=(
                f"{sites_dir} is itself a site (it holds site.toml): point "
                "data.sites-dir at the folder that holds the site folders."
                if (sites_dir / "site.toml").is_file()
                else "Run `wardround synth` or point data.sites-dir at real site "
                "folders."
            ),
        )
    from ..client.preflight import preflight_site
    from ..client.runtime import resolve_device
    from ..sitedata.site_config import check_distinct_names

    resolve_device(config.train.device)  # simulated sites train on this machine

    for site_toml in found:
        preflight_site(site_toml, config.task, images_required=config.requires_images)
    check_distinct_names(found)
    _require_secure_aggregation_sites(config, len(found))
    overrides["data"] = {"sites_dir": str(sites_dir)}
    config = config.with_overrides(**overrides)
    if config.federation.min_sites > len(found):
        config = config.with_overrides(federation={"min_sites": len(found)})
    return config, len(found)


def synthetic_sites(sites_dir: Path, n_sites: int, patients: int, seed: int) -> None:
    """Write the synthetic sites a simulation asks for, or reuse equal ones.

    ``sites_dir/synth.json`` records what was written; sites written with other
    settings (another ``--sites`` or ``--patients``) are written again, never reused.
    """
    from ..synthetic.hospitals import MARKER, synthesize_federation

    wanted = {"sites": n_sites, "patients_per_site": patients, "seed": seed}
    record = sites_dir / SYNTH_RECORD
    if any(sites_dir.glob("*/site.toml")):
        try:
            if json.loads(record.read_text()) == wanted:
                return
        except (OSError, ValueError):
            pass
        for folder in sites_dir.iterdir():
            if (folder / MARKER).is_file():
                shutil.rmtree(folder)
        foreign = sorted(p.parent.name for p in sites_dir.glob("*/site.toml"))
        if foreign:
            raise ConfigError(
                f"{sites_dir} holds site folders that `wardround synth` did not "
                f"write ({', '.join(foreign)})",
                hint="Use another --out, or name real sites with data.sites-dir.",
            )
        log.info(
            "synthetic sites in %s had other settings; writing them again", sites_dir
        )
    synthesize_federation(sites_dir, n_sites, patients_per_site=patients, seed=seed)
    record.write_text(json.dumps(wanted) + "\n")


def _require_secure_aggregation_sites(config: RunConfig, n_sites: int) -> None:
    # Sites refuse SecAgg+ among fewer than 3: say so before anything starts.
    if config.secure_aggregation.enabled and n_sites < MIN_PARTICIPANTS:
        raise ConfigError(
            f"secure aggregation (SecAgg+) needs at least {MIN_PARTICIPANTS} sites; "
            f"this simulation has {n_sites}",
            hint="Use --sites 3 or more, or --no-secagg to aggregate in the clear.",
        )


def run_simulation_engine(
    config: RunConfig,
    n_sites: int,
    *,
    observer: RoundObserver | None = None,
    verbose: bool = False,
) -> FederationResult:
    """Run the federation in Flower's simulation engine and return its result."""
    ray_tmp = Path(
        tempfile.mkdtemp(prefix="wr-ray-")
    )  # short: Ray's socket paths are limited
    apply_machine_hygiene(Path(config.output.dir) / ".state")
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    from flwr.simulation import run_simulation

    from ..client.app import build_client_app
    from ..server.app import build_server_app

    if not verbose:
        # Flower warns that run_simulation is deprecated in favour of `flwr run`;
        # `wardround simulate` keeps the in-process engine so it can stop every
        # process itself. Errors still show.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    flat = config.to_flower()
    results: list[FederationResult] = []
    server_app = build_server_app(flat, observer=observer, results=results)
    client_app = build_client_app(flat)
    backend_config = _ray_backend_config(config, ray_tmp, verbose)
    try:
        _run_interruptibly(
            lambda: run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=n_sites,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if not results:
        raise FederationError(
            "the simulation ended without finishing its rounds",
            hint="Run again with --verbose to see Flower's and Ray's logs.",
        )
    if config.model.generative:  # the texts each site generated, kept at the site
        from .samples import gather_samples

        gather_samples(
            Path(config.data.sites_dir),
            results[0].summary["run_id"],
            results[0].run_dir,
        )
    return results[0]


def _ray_backend_config(
    config: RunConfig, ray_tmp: Path, verbose: bool
) -> dict[str, Any]:
    """Ray's resources and start-up options: loopback only, no dashboard."""
    from ..client.runtime import resolve_device

    # On a GPU machine two simulated sites share each GPU; on CPU one core each.
    on_gpu = resolve_device(config.train.device).startswith("cuda")
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.5 if on_gpu else 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "_temp_dir": str(ray_tmp),
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
            "_node_ip_address": "127.0.0.1",
        },
    }


def _run_interruptibly(run_engine: Callable[[], None]) -> None:
    """Run the engine in a worker thread; stop Ray's processes on the way out.

    The main thread waits in short timed joins: a Ctrl-C or SIGTERM that the
    kernel hands to one of Ray's or gRPC's threads would otherwise never
    interrupt an untimed join, and the run would go on. On the way out, also on
    an interrupt, the guard calls ray.shutdown() first (killing the raylet under
    a connected driver makes Ray abort the whole process) and then stops leftover
    processes by PID. The engine's error is raised here.
    """
    engine_error: list[BaseException] = []

    def target() -> None:
        try:
            run_engine()
        except BaseException as exc:  # handed to the main thread below
            engine_error.append(exc)

    engine = threading.Thread(target=target, name="flower-simulation", daemon=True)
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    with ChildProcessGuard():
        engine.start()
        while engine.is_alive():
            engine.join(timeout=0.5)
            # Ray's core worker installs a native, process-wide SIGTERM handler
            # when it starts (from the engine thread); it then exits with 1 and
            # skips the cleanup. Re-assert the caller's handler while waiting.
            if callable(sigterm_handler):
                signal.signal(signal.SIGTERM, sigterm_handler)
    if engine_error:
        _raise_engine_error(engine_error[0])


def _raise_engine_error(exc: BaseException) -> None:
    """Raise the engine's error; wardround's own when Flower wrapped one."""
    cause = exc.__cause__ or exc.__context__
    if (
        isinstance(exc, RuntimeError)
        and isinstance(cause, Exception)
        and (cause.__class__.__module__.startswith("wardround"))
    ):
        raise cause from None
    raise exc
