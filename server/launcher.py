"""``wardround launch``, ``runs`` and ``stop``: runs on the deployed federation.

A run is submitted as a Flower App Bundle (FAB) built from the run config alone: a
``pyproject.toml`` that names wardround's ServerApp and ClientApp and carries every
run setting. Its sha256 is what sites approve (``wardround site approve HASH``);
the same run.toml always gives the same hash. The ServerApp writes the run
directory under the coordinator's state folder (``runs/<name>/``); ``launch`` follows
it round by round and copies it out when the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..common.config import RunConfig, flower_config_string
from ..common.errors import ConfigError, FederationError
from ..flower_compat.app_bundle import (  # noqa: F401 - launch and tests use them here
    APP_NAME,
    AppBundle,
    app_pyproject,
    build_app,
    check_deployable,
)
from ..ops.audit import AuditLog, safe_reason
from .coordinator_config import CoordinatorConfig
from .flwr_control import flwr_json

LAUNCH_FILE = "launch.json"
STATUS_FILE = "status.json"
TERMINAL_STATES = ("finished", "stopped", "failed")


def new_run_name(fab_hash: str, now: datetime | None = None) -> str:
    """A sortable, unique-enough name: UTC time and the FAB hash's prefix."""
    moment = now or datetime.now(UTC)
    return f"{moment:%Y%m%d-%H%M%S}-{fab_hash[:8]}"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file, or {} when it is missing or half-written."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def submit(
    coordinator: CoordinatorConfig,
    bundle: AppBundle,
    run_dir: Path,
    *,
    resume: bool = False,
) -> int:
    """Start the app as a Flower run writing ``run_dir``; return Flower's run id."""
    overrides = f"output.dir={flower_config_string(str(run_dir))}" + (
        " output.resume=true" if resume else ""
    )
    reply = flwr_json(coordinator, "run", str(bundle.folder), "--run-config", overrides)
    run_id = int(reply["run-id"])
    launch = read_json(run_dir / LAUNCH_FILE)
    launch.setdefault("flower_run_ids", []).append(run_id)
    _write_json(run_dir / LAUNCH_FILE, launch)
    return run_id


def site_count_warnings(coordinator: CoordinatorConfig, config: RunConfig) -> list[str]:
    """What the admin should know when a run asks for more sites than are enrolled.

    Not a refusal: sites enrolled while the run waits are taken (the ServerApp
    reads the roster again), so launching before the last enrolment works.
    """
    from .registry import load_sites

    active = sorted(
        name for name, site in load_sites(coordinator.sites_path).items() if site.active
    )
    federation = config.federation
    enrolled = (
        f"{len(active)} site(s) are enrolled and not revoked "
        f"({', '.join(active) if active else 'none'})"
    )
    warnings = []
    if federation.min_sites > len(active):
        warnings.append(
            f"federation.min-sites = {federation.min_sites}, but {enrolled}: the run "
            f"pauses at its first round until {federation.min_sites} enrolled sites "
            "connect. Enrol the others (`wardround sites add NAME --key NAME.pub`), or "
            "stop it and lower min-sites."
        )
    if federation.expected_sites > len(active):
        warnings.append(
            f"federation.expected-sites = {federation.expected_sites}, but {enrolled}: "
            f"every round waits join-timeout-s ({federation.join_timeout_s:g} s) for "
            "the missing sites before it goes on without them."
        )
    return warnings


def launch_run(
    coordinator: CoordinatorConfig, config: RunConfig, config_path: Path
) -> tuple[str, Path, AppBundle]:
    """Build, record and submit a new run; return its name, directory and bundle."""
    from wardround import __version__

    bundle = build_app(config, coordinator.state_path / "apps")
    name = new_run_name(bundle.fab_hash)
    run_dir = coordinator.runs_path / name
    run_dir.mkdir(parents=True, exist_ok=False)
    _write_json(
        run_dir / LAUNCH_FILE,
        {
            "name": name,
            "fab_hash": bundle.fab_hash,
            "app_dir": str(bundle.folder),
            "config": str(Path(config_path).resolve()),
            "launched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wardround_version": __version__,
            "flower_run_ids": [],
        },
    )
    flower_id = submit(coordinator, bundle, run_dir)
    AuditLog(coordinator.audit_path, actor="admin").record(
        "run_started",
        run_id=name,
        flower_run_id=str(flower_id),
        fab_hash=bundle.fab_hash,
    )
    return name, run_dir, bundle


def run_status(run_dir: Path) -> dict[str, Any]:
    """What the ServerApp last wrote (status.json), with the rounds completed."""
    status = read_json(run_dir / STATUS_FILE)
    rounds_file = run_dir / "rounds.jsonl"
    done = 0
    if rounds_file.exists():
        done = sum(1 for line in rounds_file.read_text().splitlines() if line.strip())
    status["rounds_done"] = max(done - 1, 0)  # round 0 is the baseline evaluation
    return status


def flower_status(coordinator: CoordinatorConfig, flower_run_id: int) -> dict[str, Any]:
    """Flower's view of a run (``flwr ls --run-id``): status and details."""
    runs = flwr_json(coordinator, "ls", "--run-id", str(flower_run_id)).get("runs", [])
    return runs[0] if runs else {}


@dataclass
class FollowResult:
    """How a followed run ended."""

    state: str
    reason: str
    status: dict[str, Any]


def follow(
    coordinator: CoordinatorConfig,
    run_dir: Path,
    on_progress: Callable[[dict[str, Any]], None],
    *,
    poll_s: float = 1.0,
    flower_poll_s: float = 5.0,
) -> FollowResult:
    """Follow a run until it ends; the ServerApp's status file is the main source.

    Flower's own status (``flwr ls``) is checked every ``flower_poll_s``: it tells a
    ServerApp that died without writing its status (a crash, a stop) apart from a
    slow round. A run whose coordinator restarts keeps being followed: the restarted
    coordinator resumes it under a new Flower run id (listed in launch.json).
    """
    last_flower = 0.0
    while True:
        status = run_status(run_dir)
        on_progress(status)
        state = status.get("state", "starting")
        if state in TERMINAL_STATES:
            return FollowResult(state, status.get("reason") or "", status)
        if time.monotonic() - last_flower >= flower_poll_s:
            last_flower = time.monotonic()
            ids = read_json(run_dir / LAUNCH_FILE).get("flower_run_ids", [])
            if ids:
                try:
                    flower = flower_status(coordinator, int(ids[-1]))
                except FederationError:
                    flower = {}  # the coordinator is restarting: keep following
                if str(flower.get("status", "")).startswith("finished"):
                    time.sleep(poll_s)  # the ServerApp may have written its last status
                    status = run_status(run_dir)
                    if status.get("state") in TERMINAL_STATES:
                        return FollowResult(
                            status["state"], status.get("reason") or "", status
                        )
                    if (
                        read_json(run_dir / LAUNCH_FILE).get("flower_run_ids", [])
                        == ids
                    ):
                        details = flower.get("status-details") or flower.get("status")
                        return FollowResult("failed", f"Flower: {details}", status)
        time.sleep(poll_s)


def check_copy_target(
    out: Path, run_dir: Path | None, coordinator_state: Path | None = None
) -> None:
    """Refuse an ``--out`` folder the run's copy would wipe or that holds the run.

    A copy goes into a missing or empty folder, or replaces an earlier copy of the
    same run that holds nothing the run lacks. Anything else (the admin's working
    folder, another run's copy, files added to an earlier copy, the coordinator's
    state) stays. ``run_dir`` None: before the launch, when the run has no folder.
    ``out`` naming ``run_dir`` itself is allowed: nothing is copied.
    """
    out = Path(out).expanduser().resolve()
    run = None if run_dir is None else Path(run_dir).resolve()
    run_name = None if run_dir is None else Path(run_dir).name
    if out == run:
        return
    advice = (
        "Give a new or empty folder, or leave --out out (runs/NAME). The run itself "
        "stays in the coordinator's state either way."
    )
    kept = [] if run is None else [run]
    if coordinator_state is not None:
        state = Path(coordinator_state).expanduser()
        # the state folder and its runs folder, each as it resolves (a symlink
        # may put the runs on another disk)
        kept += [state.resolve(), (state / "runs").resolve()]
    for folder in kept:
        if out == folder or folder in out.parents or out in folder.parents:
            raise ConfigError(
                f"--out {out} is the coordinator's state or runs folder, or inside "
                "or above it: the run's copy does not belong there",
                hint=advice,
            )
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(
            f"--out {out} is a file: the run directory is copied into a folder",
            hint=advice,
        )
    if not any(out.iterdir()):
        return
    launch = read_json(out / LAUNCH_FILE)
    earlier = launch.get("name") if isinstance(launch, dict) else None
    this_run = "the run" if run_name is None else f"run {run_name}"
    if run is None or earlier != run_name:
        held = f"a copy of run {earlier}" if earlier else "other files"
        raise ConfigError(
            f"--out {out} holds {held}; copying {this_run} there would delete them",
            hint=advice,
        )
    added = sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if not p.is_dir() and not (run / p.relative_to(out)).exists()
    )
    if added:
        raise ConfigError(
            f"--out {out} is an earlier copy of {this_run} with {len(added)} file(s) "
            f"the run does not have ({', '.join(added[:3])}"
            f"{', ...' if len(added) > 3 else ''}); a new copy would delete them",
            hint=advice,
        )


def copy_run(run_dir: Path, out: Path, coordinator_state: Path | None = None) -> Path:
    """Copy the run directory out of the coordinator's state into ``out``.

    ``out`` must pass :func:`check_copy_target`. The copy is made beside ``out``
    and moved in only when complete, so a failed copy leaves ``out`` as it was.
    Returns where the run is (``run_dir`` itself when ``out`` names it).
    """
    check_copy_target(out, run_dir, coordinator_state)
    out = Path(out).expanduser().resolve()
    if out == Path(run_dir).resolve():
        return Path(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.copying-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(run_dir, partial)
        if out.is_dir() and not any(out.iterdir()):
            # an empty folder, maybe the admin's working folder: fill it in place
            shutil.copytree(partial, out, dirs_exist_ok=True)
            shutil.rmtree(partial)
        else:
            if out.exists():
                shutil.rmtree(out)  # an earlier copy of this run, checked above
            partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def list_runs(coordinator: CoordinatorConfig) -> list[dict[str, Any]]:
    """Every run the coordinator has, newest first."""
    rows: list[dict[str, Any]] = []
    if not coordinator.runs_path.is_dir():
        return rows
    for run_dir in sorted(coordinator.runs_path.iterdir(), reverse=True):
        launch = read_json(run_dir / LAUNCH_FILE)
        if not launch:
            continue
        status = run_status(run_dir)
        rows.append(
            {
                "name": run_dir.name,
                "state": status.get("state", "starting"),
                "round": status.get("rounds_done", 0),
                "rounds": status.get("rounds"),
                "reason": status.get("reason"),
                "fab_hash": launch.get("fab_hash"),
                "flower_run_ids": launch.get("flower_run_ids", []),
                "launched_at": launch.get("launched_at"),
                "dir": str(run_dir),
            }
        )
    return rows


def find_run(coordinator: CoordinatorConfig, name: str) -> Path:
    """A run's directory by name (or a unique prefix of it)."""
    matches = [
        p for p in coordinator.runs_path.glob(f"{name}*") if (p / LAUNCH_FILE).exists()
    ]
    if len(matches) != 1:
        known = ", ".join(r["name"] for r in list_runs(coordinator)[:10]) or "none"
        what = "no run" if not matches else "several runs"
        raise ConfigError(f"{what} named {name!r} (recent runs: {known})")
    return matches[0]


def mark_stopped(run_dir: Path, reason: str) -> None:
    """Record that a run was stopped on purpose (it is not resumed)."""
    status = read_json(run_dir / STATUS_FILE)
    status.update(
        state="stopped",
        reason=reason,
        updated=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_json(run_dir / STATUS_FILE, status)


def stop_run(coordinator: CoordinatorConfig, name: str) -> Path:
    """Stop a run: Flower stops its ServerApp; the run is marked stopped (not resumed)."""
    run_dir = find_run(coordinator, name)
    status = read_json(run_dir / STATUS_FILE)
    if status.get("state") in TERMINAL_STATES:
        # A finished run's record must stay "finished".
        reason = f" ({status['reason']})" if status.get("reason") else ""
        raise ConfigError(
            f"run {run_dir.name} has already {status['state']}{reason}; there is "
            "nothing to stop",
            hint=f"`wardround runs {run_dir.name}` shows it.",
        )
    ids = read_json(run_dir / LAUNCH_FILE).get("flower_run_ids", [])
    if ids:
        try:
            flwr_json(coordinator, "stop", str(ids[-1]))
        except FederationError as exc:
            if "finished" not in exc.message.lower():
                raise
            ended = read_json(run_dir / STATUS_FILE).get("state")
            if ended in TERMINAL_STATES:  # it ended before the stop reached it
                raise ConfigError(
                    f"run {run_dir.name} {ended} before the stop reached it",
                    hint=f"`wardround runs {run_dir.name}` shows it.",
                ) from None
    mark_stopped(run_dir, "stopped by the coordinator admin")
    AuditLog(coordinator.audit_path, actor="admin").record(
        "run_stopped", run_id=run_dir.name, reason="stopped by the coordinator admin"
    )
    return run_dir


def unfinished_runs(coordinator: CoordinatorConfig) -> list[Path]:
    """Runs a restarted coordinator must resume (launched, not ended)."""
    return [
        Path(row["dir"])
        for row in list_runs(coordinator)
        if row["state"] not in TERMINAL_STATES
    ]


def resume_run(coordinator: CoordinatorConfig, run_dir: Path) -> int:
    """Stop the run's old Flower run (if the SuperLink still knows it) and resubmit it."""
    launch = read_json(run_dir / LAUNCH_FILE)
    for old in launch.get("flower_run_ids", [])[-1:]:
        try:
            flwr_json(coordinator, "stop", str(old))
        except FederationError:
            pass  # already finished, or unknown after the restart
    bundle = AppBundle(folder=Path(launch["app_dir"]), fab_hash=launch["fab_hash"])
    flower_id = submit(coordinator, bundle, run_dir, resume=True)
    AuditLog(coordinator.audit_path, actor="coordinator").record(
        "run_resumed",
        run_id=run_dir.name,
        flower_run_id=str(flower_id),
        reason=safe_reason("coordinator restarted"),
    )
    return flower_id
