"""``wardround coordinator start``: the coordinator daemon.

It runs Flower's SuperLink with TLS and SuperNode authentication on one port, with
its database in the state folder (enrolled keys and runs survive a restart), and
stops it by PID on SIGTERM. On start it resumes every run that was launched and not
ended, from the run's last completed round. The ServerApp of each run inherits
``WARDROUND_COORDINATOR_STATE`` and so finds the enrolled sites and the audit log.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from ..common.audit import AuditLog, safe_reason
from ..common.env import apply_machine_hygiene
from ..common.errors import ConfigError, FederationError
from ..common.processes import flower_binary, start_child, stop_child
from .coordinator_config import CoordinatorConfig
from .flwr_control import write_connection

log = logging.getLogger(__name__)

STATE_ENV = "WARDROUND_COORDINATOR_STATE"
SUPERLINK_LOG = "superlink.log"


def check_tls(config: CoordinatorConfig) -> None:
    """The TLS files exist, match, have not expired and the key is private."""
    from ..deploy.pki import describe_certificate, verify_issued_by

    for what, path in (
        ("ca-certificate", config.ca_path),
        ("certificate", config.certificate_path),
        ("private-key", config.private_key_path),
    ):
        if not path.is_file():
            raise ConfigError(
                f"[tls] {what} {path} does not exist",
                hint="Create them with `wardround certs init` and `wardround certs server`.",
            )
    if not verify_issued_by(config.certificate_path, config.ca_path):
        raise ConfigError(
            f"[tls] certificate {config.certificate_path} is not signed by "
            f"ca-certificate {config.ca_path}",
            hint="Issue it from this CA: `wardround certs server --ca DIR --host NAME`.",
        )
    info = describe_certificate(config.certificate_path)
    if info.days_left < 0:
        raise ConfigError(
            f"[tls] certificate {config.certificate_path} expired on "
            f"{info.not_after:%Y-%m-%d}",
            hint="Issue a new one (`wardround certs server`) and restart.",
        )
    if config.private_key_path.stat().st_mode & 0o077:
        raise ConfigError(
            f"[tls] private-key {config.private_key_path} is readable by other users",
            hint=f"Run `chmod 600 {config.private_key_path}`.",
        )


def superlink_command(config: CoordinatorConfig) -> list[str]:
    """The ``flower-superlink`` command line.

    No ``--database``: Flower's SQL state costs the SuperLink ~0.1 s of CPU per
    array it relays (measured: a plain round took 34 s with it, 17.5 s without). The
    coordinator's own state folder is the durable record: ``sites.json`` (enrolled
    keys, registered again at start), ``runs/`` (checkpoints; unfinished runs are
    resubmitted) and the audit log.
    """
    return [
        flower_binary("flower-superlink"),
        "--ssl-ca-certfile",
        str(config.ca_path),
        "--ssl-certfile",
        str(config.certificate_path),
        "--ssl-keyfile",
        str(config.private_key_path),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        config.coordinator.host,
        "--port",
        str(config.coordinator.port),
    ]


def _listening(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def run_coordinator(
    config: CoordinatorConfig,
    stop: threading.Event,
    *,
    on_ready: callable | None = None,  # type: ignore[valid-type]
) -> None:
    """Run the SuperLink until ``stop`` is set; resume unfinished runs once it is up."""
    check_tls(config)
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    if _listening(config.coordinator.host, config.coordinator.port):
        raise FederationError(
            f"port {config.coordinator.port} is already in use",
            hint="Stop what listens there, or set [coordinator] port.",
        )
    saved = dict(os.environ)
    os.environ["FLWR_HOME"] = str(config.flwr_home)
    apply_machine_hygiene(state)
    os.environ[STATE_ENV] = str(state)
    write_connection(config)
    audit = AuditLog(config.audit_path, actor="coordinator")
    log_path = state / SUPERLINK_LOG
    link = start_child(superlink_command(config), dict(os.environ), log_path)
    failure: FederationError | None = None
    try:
        deadline = time.monotonic() + 60
        while not _listening(config.coordinator.host, config.coordinator.port):
            if link.poll() is not None or time.monotonic() > deadline:
                raise FederationError(
                    "the SuperLink did not start", hint=f"See {log_path}."
                )
            if stop.wait(0.2):
                return
        from .registry import reenrol_sites

        reenrolled = reenrol_sites(config)
        audit.record(
            "coordinator_started",
            sites_reenrolled=reenrolled,
            port=config.coordinator.port,
            pid=os.getpid(),
            superlink_pid=link.pid,
        )
        if on_ready:
            on_ready()
        threading.Thread(
            target=_resume_all, args=(config, audit), name="resume", daemon=True
        ).start()
        while not stop.wait(0.5):
            if link.poll() is not None:
                failure = FederationError(
                    f"the SuperLink exited with code {link.returncode}",
                    hint=f"See {log_path}.",
                )
                break
    finally:
        stop_child(link)
        try:
            audit.record(
                "coordinator_stopped",
                reason=safe_reason(failure.message) if failure else "stopped",
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)
    if failure is not None:
        raise failure


def _resume_all(config: CoordinatorConfig, audit: AuditLog) -> None:
    from .launcher import resume_run, unfinished_runs

    for run_dir in unfinished_runs(config):
        try:
            flower_id = resume_run(config, Path(run_dir))
            log.info("resumed run %s as Flower run %d", run_dir.name, flower_id)
        except Exception as exc:  # noqa: BLE001 - one bad run must not stop the rest
            log.error("could not resume run %s: %s", run_dir.name, exc)
            audit.record(
                "error",
                run_id=run_dir.name,
                reason=safe_reason(f"resume failed: {exc}"),
            )
