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


def check_copy_target(out: Path, run_name: str) -> None:
    """Refuse an ``--out`` folder the run's copy would wipe.

    A copy replaces only a missing or empty folder, or an earlier copy of the same
    run; anything else (the admin's working folder, another run's copy) stays.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(
            f"--out {out} is a file: the run directory is copied into a folder",
            hint="Give a new or empty folder, or leave --out out (runs/NAME).",
        )
    if not any(out.iterdir()):
        return
    launch = read_json(out / LAUNCH_FILE)
    earlier = launch.get("name") if isinstance(launch, dict) else None
    if earlier == run_name:
        return
    held = f"a copy of run {earlier}" if earlier else "other files"
    raise ConfigError(
        f"--out {out} holds {held}; copying run {run_name} there would delete them",
        hint="Give a new or empty folder, or leave --out out (runs/NAME). "
        "The run itself stays in the coordinator's state either way.",
    )


def copy_run(run_dir: Path, out: Path) -> Path:
    """Copy the run directory out of the coordinator's state into ``out``.

    ``out`` must pass :func:`check_copy_target` (an earlier copy of the same run
    is replaced).
    """
    out = Path(out)
    check_copy_target(out, run_dir.name)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run_dir, out)
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
