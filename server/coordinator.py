"""``wardround coordinator start``: the coordinator daemon.

It runs three processes and stops them by PID on SIGTERM:

- Flower's SuperLink, with TLS and SuperNode authentication, bound to 127.0.0.1 on
  ``[coordinator] internal-port``: its Control API (the admin commands) and its
  Runtime API (the ServerApp) are reachable from the coordinator host only;
- Flower's SuperExec, which starts each run's ServerApp process; it signs its
  Runtime API calls with a secret the SuperLink checks (``superexec.secret``, 0600,
  fresh at each start), so no other local process can take a run's task;
- nginx on the public ``host``/``port``, passing only the Fleet API that sites use
  (:mod:`.fleet_proxy`).

In a thread of its own it serves the read-only dashboard and ``/metrics``
(:mod:`.dashboard`, ``[dashboard]``; 127.0.0.1 by default).

On start it resumes every run that was launched and not ended, from the run's last
completed round. The ServerApp of each run inherits ``WARDROUND_COORDINATOR_STATE``
and so finds the enrolled sites and the audit log.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..common.errors import ConfigError, FederationError
from ..ops.audit import AuditLog, safe_reason
from ..ops.env import apply_machine_hygiene
from ..ops.file_lock import sole_user
from ..ops.processes import flower_binary, start_child, stop_child
from .coordinator_config import CoordinatorConfig
from .fleet_proxy import error_log_tail, find_nginx, nginx_command, write_nginx_conf
from .flwr_control import write_connection

log = logging.getLogger(__name__)

STATE_ENV = "WARDROUND_COORDINATOR_STATE"
SUPERLINK_LOG = "superlink.log"
SUPEREXEC_LOG = "superexec.log"
NGINX_LOG = "nginx.log"
LOOPBACK_IP = "127.0.0.1"


def check_tls(config: CoordinatorConfig) -> None:
    """The TLS files exist, match, have not expired and the key is private."""
    from ..pki import describe_certificate, verify_issued_by
    from ..pki.loading import check_key_matches_certificate

    for what, path in (
        ("ca-certificate", config.ca_path),
        ("certificate", config.certificate_path),
        ("private-key", config.private_key_path),
    ):
        if path.is_dir():
            raise ConfigError(f"[tls] {what} {path} is a folder; name the file")
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
    if info.not_before > dt.datetime.now(dt.UTC):
        raise ConfigError(
            f"[tls] certificate {config.certificate_path} is valid only from "
            f"{info.not_before:%Y-%m-%d %H:%M} UTC: sites refuse it until then",
            hint="Check this machine's clock, or issue one valid from now.",
        )
    if LOOPBACK_IP not in info.ip_addresses:
        raise ConfigError(
            f"[tls] certificate {config.certificate_path} does not name {LOOPBACK_IP}: "
            "the admin commands and the ServerApp reach the SuperLink there",
            hint="Issue it with `--ip 127.0.0.1` as well (`wardround certs server`).",
        )
    if config.private_key_path.stat().st_mode & 0o077:
        raise ConfigError(
            f"[tls] private-key {config.private_key_path} is readable by other users",
            hint=f"Run `chmod 600 {config.private_key_path}`.",
        )
    check_key_matches_certificate(config.private_key_path, config.certificate_path)


def superlink_command(config: CoordinatorConfig) -> list[str]:
    """The ``flower-superlink`` command line: loopback only, SuperExec authenticated.

    ``--isolation process``: the coordinator starts the SuperExec itself (Flower
    ignores the SuperExec secret when the SuperLink starts its own).

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
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(config.superexec_secret_path),
        "--host",
        LOOPBACK_IP,
        "--port",
        str(config.coordinator.internal_port),
    ]


def superexec_command(config: CoordinatorConfig) -> list[str]:
    """The ``flower-superexec`` command line: it launches each run's ServerApp."""
    return [
        flower_binary("flower-superexec"),
        "--runtime-api-address",
        config.internal_address,
        "--root-certificates",
        str(config.ca_path),
        "--superexec-auth-secret-file",
        str(config.superexec_secret_path),
        "--parent-pid",
        str(os.getpid()),
    ]


def write_superexec_secret(config: CoordinatorConfig) -> Path:
    """A fresh random SuperExec secret, mode 0600, shared by SuperLink and SuperExec."""
    path = config.superexec_secret_path
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


def _listening(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_listening(
    what: str,
    port: int,
    child: subprocess.Popen[bytes],
    stop: threading.Event,
    hint: str,
    host: str = LOOPBACK_IP,
) -> bool:
    """Wait until ``child`` listens on ``port``; False when ``stop`` was set."""
    deadline = time.monotonic() + 60
    while not _listening(host, port):
        if child.poll() is not None or time.monotonic() > deadline:
            raise FederationError(f"{what} did not start", hint=hint)
        if stop.wait(0.2):
            return False
    return True


def _check_ports_free(config: CoordinatorConfig) -> None:
    section = config.coordinator
    ports = [
        (section.port, section.host, "[coordinator] port"),
        (section.internal_port, LOOPBACK_IP, "[coordinator] internal-port"),
    ]
    if config.dashboard.enabled:
        ports.append((config.dashboard.port, config.dashboard.host, "[dashboard] port"))
    seen: set[int] = set()
    for port, host, key in ports:
        if port in seen:
            raise ConfigError(
                f"{key} {port} is also used by another of the coordinator's ports",
                hint=f"Give {key} a port of its own.",
            )
        seen.add(port)
        # the public port is probed by binding: connecting to a configured address
        # could reach another machine
        if key != "[coordinator] port" and _listening(host, port):
            raise FederationError(
                f"port {port} is already in use",
                hint=f"Stop what listens there, or set {key}.",
            )
    _check_bindable(section.host, section.port)


def _check_bindable(host: str, port: int) -> None:
    """Refuse a public address nginx could not listen on, before anything starts.

    nginx would otherwise exit with the reason only in its error log. Every
    address the host resolves to is tried, as nginx listens on each.
    """
    bind_host = "0.0.0.0" if host in ("", "*") else host.strip("[]")
    fix = (
        "Set [coordinator] host to one of this machine's addresses, or 0.0.0.0 for all."
    )
    try:
        infos = socket.getaddrinfo(
            bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError):
        raise ConfigError(
            f"[coordinator] host {host!r} does not resolve on this machine", hint=fix
        ) from None
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EACCES:
                # nginx may hold the capability to bind low ports that we lack
                log.warning(
                    "this account may not listen on port %d; nginx needs the right to",
                    port,
                )
                continue
            if exc.errno == errno.EADDRINUSE:
                raise FederationError(
                    f"port {port} is already in use on {address[0]}",
                    hint="Stop what listens there (`ss -ltnp 'sport = :"
                    f"{port}'`), or set [coordinator] port.",
                ) from None
            why = (
                "is not an address of this machine"
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
                else f"cannot be listened on ({exc.strerror})"
            )
            raise ConfigError(
                f"[coordinator] host {host!r} ({address[0]}) {why}", hint=fix
            ) from None


def run_coordinator(
    config: CoordinatorConfig,
    stop: threading.Event,
    *,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run the SuperLink, SuperExec and nginx until ``stop`` is set.

    Unfinished runs are resumed once all three are up. A second coordinator on
    the same state folder is refused before it writes anything: it would
    re-enrol the sites under new node ids behind the running one's back.
    """
    with sole_user(config.state_path, "coordinator"):
        _run_coordinator(config, stop, on_ready)


def _run_coordinator(
    config: CoordinatorConfig,
    stop: threading.Event,
    on_ready: Callable[[], None] | None,
) -> None:
    saved, nginx = _prepare(config)
    audit = AuditLog(config.audit_path, actor="coordinator")
    children: dict[str, subprocess.Popen[bytes]] = {}
    failure: FederationError | None = None
    dashboard = None
    try:
        if not _start_children(config, nginx, children, stop):
            return
        from .registry import reenrol_sites

        reenrolled = reenrol_sites(config)
        from .dashboard.app import start_coordinator_dashboard

        dashboard = start_coordinator_dashboard(config)
        audit.record(
            "coordinator_started",
            sites_reenrolled=reenrolled,
            port=config.coordinator.port,
            internal_port=config.coordinator.internal_port,
            pid=os.getpid(),
            superlink_pid=children["the SuperLink"].pid,
            superexec_pid=children["the SuperExec"].pid,
            nginx_pid=children["nginx"].pid,
            dashboard=dashboard.exposure.url if dashboard else "off",
        )
        if on_ready:
            on_ready()
        threading.Thread(
            target=_resume_all, args=(config, audit), name="resume", daemon=True
        ).start()
        failure = _watch(children, stop, config.state_path)
    finally:
        if dashboard is not None:
            dashboard.stop()
        # nginx first: no site call reaches a SuperLink that is going away.
        for child in reversed(list(children.values())):
            stop_child(child)
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


def _prepare(config: CoordinatorConfig) -> tuple[dict[str, str], str]:
    """Check the settings, set the environment, write the children's files.

    Returns the environment as it was (for the caller to put back) and nginx's path.
    """
    check_tls(config)
    if config.dashboard.enabled:
        from .dashboard.app import coordinator_exposure

        coordinator_exposure(config)  # a bad [dashboard] stops us before anything runs
    nginx = find_nginx(config)
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_ports_free(config)
    saved = dict(os.environ)
    os.environ["FLWR_HOME"] = str(config.flwr_home)
    apply_machine_hygiene(state)
    os.environ[STATE_ENV] = str(state)
    write_connection(config)
    write_superexec_secret(config)
    write_nginx_conf(config)
    return saved, nginx


def _start_children(
    config: CoordinatorConfig,
    nginx: str,
    children: dict[str, subprocess.Popen[bytes]],
    stop: threading.Event,
) -> bool:
    """Start the SuperLink, the SuperExec and nginx into ``children``.

    False when ``stop`` was set (or a child died) before they were listening.
    """
    state = config.state_path
    log_path = state / SUPERLINK_LOG
    children["the SuperLink"] = start_child(
        superlink_command(config), dict(os.environ), log_path
    )
    if not _wait_listening(
        "the SuperLink",
        config.coordinator.internal_port,
        children["the SuperLink"],
        stop,
        f"See {log_path}.",
    ):
        return False
    children["the SuperExec"] = start_child(
        superexec_command(config), dict(os.environ), state / SUPEREXEC_LOG
    )
    children["nginx"] = start_child(
        nginx_command(config, nginx), dict(os.environ), state / NGINX_LOG
    )
    try:
        return _wait_listening(
            "nginx",
            config.coordinator.port,
            children["nginx"],
            stop,
            f"See {config.nginx_path}.",
            host=config.coordinator.host,
        )
    except FederationError as exc:
        tail = error_log_tail(config)
        raise FederationError(
            f"nginx did not start{': ' + tail if tail else ''}", hint=exc.hint
        ) from None


def _watch(
    children: dict[str, subprocess.Popen[bytes]], stop: threading.Event, state: Path
) -> FederationError | None:
    """Wait until ``stop`` is set or a child exits (the error that says which)."""
    while not stop.wait(0.5):
        for what, child in children.items():
            if child.poll() is not None:
                return FederationError(
                    f"{what} exited with code {child.returncode}",
                    hint=f"See the logs in {state}.",
                )
    return None


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
