"""``wardround site start``: the site daemon.

It checks the site (the same checks as ``wardround site check``) and its deployment
settings, then runs two things until SIGTERM:

- a Flower SuperNode (``flower-supernode``) that connects *out* to the coordinator
  over TLS, authenticates with the site's enrolled key, retries through coordinator
  restarts and network loss, and keeps its local Runtime API on 127.0.0.1;
- the warm worker (:mod:`wardround.client.site_worker`) that takes the SuperNode's
  ClientApp tasks, under ``--isolation process``, with the model and data loaded once.
  The Runtime API is authenticated: the SuperNode checks every ``AcquireTask``
  against ``<state-dir>/superexec.secret`` (Flower's ``--superexec-auth-secret-file``,
  created once, mode 0600), which only the site's own user can read.

Everything the site does is appended to ``<state-dir>/audit.jsonl``, and what each
reply carried to ``<state-dir>/egress.jsonl``. A thread serves the operator's
read-only dashboard and ``/metrics`` (``[dashboard]``; 127.0.0.1 by default).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common import wire
from ..common.config import flower_config_string
from ..common.errors import ConfigError, DataError, FederationError
from ..ops.audit import AuditLog, safe_reason
from ..ops.audit_fields import coordinator_label
from ..ops.env import apply_machine_hygiene
from ..ops.file_lock import sole_user
from ..ops.processes import start_child, stop_child
from ..ops.secret_file import load_or_create_secret
from ..sitedata.site_config import SiteConfig
from .answer_audit import Repeats, refusal_kind, worth_recording
from .approvals import AppApprovals
from .connection_watch import ConnectionWatch
from .egress_log import EGRESS_FILE
from .runtime_tls import (
    RUNTIME_HOST,
    RuntimeTls,
    bypass_proxy_for_loopback,
    issue_runtime_tls,
    serves_runtime_tls,
)
from .site_worker import APP_NOT_APPROVED, SiteWorker, TaskObserver, TaskOutcome
from .supernode_main import POLL_ENV

log = logging.getLogger(__name__)

SUPERNODE_LOG = "supernode.log"
AUDIT_FILE = "audit.jsonl"
SUPEREXEC_SECRET_FILE = "superexec.secret"
RUN_NAMES_KEPT = 64
"""Flower runs whose names the site keeps for its egress log (the newest)."""

_KEY_REFUSED = "Failed to activate SuperNode"
_STABLE_S = 30.0  # a SuperNode up this long was not refused
_MAX_QUICK_EXITS = (
    6  # unexplained exits in a row (each under _STABLE_S) before giving up
)
_MAX_RESTART_DELAY_S = 30.0

# What the SuperNode prints when the coordinator turns it away, and what to do.
_REFUSALS = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "TLS: the coordinator's certificate is not signed by this site's "
        "deployment.root-certificate (or does not name the coordinator's address)",
        "Install the federation's ca.pem as deployment.root-certificate, and check "
        "deployment.coordinator against the names in the coordinator's certificate.",
    ),
    (
        _KEY_REFUSED,
        "the coordinator refused this site's key: it is not enrolled, it was "
        "revoked, or a daemon with the same key is connected already",
        "If another `wardround site start` of this site runs (on this or another "
        "machine), stop one of them: a site runs one daemon. Otherwise send the "
        "site's public key (.pub) to the coordinator admin, who runs "
        "`wardround sites add NAME --key NAME.pub --config coordinator.toml`.",
    ),
)


@dataclass(frozen=True)
class SitePlan:
    """What the daemon will start, resolved and checked."""

    site: SiteConfig
    site_toml: Path
    coordinator: str
    root_certificate: Path
    private_key: Path
    state_dir: Path
    check_report: dict = field(default_factory=dict)
    """The ``site check`` report made at start (the site dashboard shows it)."""


def plan_site(site_toml: Path) -> SitePlan:
    """Check ``site.toml`` for deployment; ConfigError/DataError say what to fix."""
    from ..pki import describe_certificate
    from ..pki.loading import check_site_private_key
    from .site_check import check_site, format_report

    site_toml = Path(site_toml).resolve()
    site = SiteConfig.from_toml(site_toml)
    dep = site.deployment
    missing = [
        key
        for key, value in (
            ("coordinator", dep.coordinator),
            ("root-certificate", dep.root_certificate),
            ("private-key", dep.private_key),
        )
        if not value
    ]
    if missing:
        raise ConfigError(
            f"{site_toml} [deployment] lacks {', '.join(missing)}",
            hint='Add them: coordinator = "host:port", root-certificate = the '
            "federation's ca.pem, private-key = the key from `wardround keys site`.",
        )
    if site.dashboard.enabled:
        from .dashboard.app import site_exposure

        site_exposure(site, site_toml)  # a bad [dashboard] is refused before the check
    root, key = site.resolve(dep.root_certificate), site.resolve(dep.private_key)
    for what, path in (("root-certificate", root), ("private-key", key)):
        if path.is_dir():
            raise ConfigError(f"deployment.{what} {path} is a folder; name the file")
        if not path.is_file():
            raise ConfigError(f"deployment.{what} {path} does not exist")
    check_site_private_key(key)
    info = describe_certificate(root)
    if info.days_left < 0:
        raise ConfigError(
            f"deployment.root-certificate {root} expired on {info.not_after:%Y-%m-%d}",
            hint="Install the federation's current ca.pem.",
        )
    if key.stat().st_mode & 0o077:
        raise ConfigError(
            f"the site's private key {key} is readable by other users",
            hint=f"Run `chmod 600 {key}`.",
        )
    report = check_site(site_toml, _default_task())
    if not report["can_train"]:
        raise DataError(
            "the site cannot train; `wardround site check` reports:\n"
            + format_report(report),
            hint="Fix the blocking problems, then start the site again.",
        )
    return SitePlan(
        site=site,
        site_toml=site_toml,
        coordinator=dep.coordinator,
        root_certificate=root,
        private_key=key,
        state_dir=site.state_path.resolve(),
        check_report=report,
    )


def _default_task():  # noqa: ANN202 - a TaskConfig; imported late to keep --help fast
    from ..common.config import RunConfig

    return RunConfig().task


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def supernode_command(
    plan: SitePlan, runtime_port: int, tls: RuntimeTls | None
) -> list[str]:
    """The ``flower-supernode`` command line of this site.

    ``tls``: the Runtime API's certificate of this daemon start (the daemon always
    gives one; None serves it in plain HTTP, for tests of the command alone).
    """
    return [
        sys.executable,
        "-m",
        "wardround.client.supernode_main",
        "--superlink",
        plan.coordinator,
        "--root-certificates",
        str(plan.root_certificate),
        "--auth-supernode-private-key",
        str(plan.private_key),
        "--node-config",
        f"site-config={flower_config_string(str(plan.site_toml))}",
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--superexec-auth-secret-file",
        str(plan.state_dir / SUPEREXEC_SECRET_FILE),
        *(tls.supernode_args() if tls is not None else []),
    ]


def refusal_in(log_text: str) -> FederationError | None:
    """The coordinator's refusal the SuperNode logged, as an error that says what to do."""
    for marker, message, hint in _REFUSALS:
        if marker in log_text:
            return FederationError(message, hint=hint)
    return None


class AuditingObserver(TaskObserver):
    """Writes each task of the site's worker to the site's audit log.

    With ``egress_path``, each approved task's reply is also described in the
    egress log (:mod:`.egress_log`): tensor names, bytes and metrics.
    """

    def __init__(
        self,
        audit: AuditLog,
        egress_path: Path | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.audit = audit
        self.egress_path = egress_path
        self.say = say
        """Gets one line per training answer, for the operator's terminal."""
        self.runs_seen: set[int] = set()
        self.run_names: dict[int, str] = {}
        """The first run name each Flower run's train and evaluate messages gave:
        SecAgg+'s other stages carry none, and are recorded under it too."""
        self.repeats = Repeats()
        """Refused and failed tasks: thinned like refused answers, whatever run,
        app or round the coordinator names (:func:`.answer_audit.worth_recording`)."""

    def on_task(self, outcome: TaskOutcome) -> None:
        """One task: a refusal, a new run, a round's work, privacy spent, an error.

        Each line is written on its own: a field the audit log refuses (a value the
        coordinator chose) costs that line only, not the egress log's or the
        terminal's record of what was sent. Refused apps and failed tasks are
        thinned past the tenth of a kind, in every log alike.
        """
        run = str(outcome.run_id)
        if not outcome.approved:
            count = self.repeats.seen("app_refused")
            if worth_recording(count):
                self._audit(
                    "app_refused",
                    run_id=run,
                    fab_hash=outcome.fab_hash,
                    reason=APP_NOT_APPROVED,
                    repeated=count,
                )
            return
        failed = (
            0
            if outcome.ok
            else self.repeats.seen("failed", refusal_kind(outcome.error or ""))
        )
        if failed and not worth_recording(failed):
            return
        self._remember_name(outcome)
        if outcome.run_id not in self.runs_seen:
            self.runs_seen.add(outcome.run_id)
            self._audit("run_started", run_id=run, fab_hash=outcome.fab_hash)
        server_round = (
            outcome.server_round
            if outcome.server_round is not None
            else _round_of(outcome.group)
        )
        fields: dict[str, Any] = {
            "run_id": run,
            "round": server_round,
            "message_type": outcome.message_type,
            "bytes_in": outcome.bytes_in,
            "bytes_out": outcome.bytes_out,
            "seconds": round(outcome.seconds, 3),
            "app_seconds": round(outcome.app_seconds, 3),
            "pull_seconds": round(outcome.pull_seconds, 3),
            "ok": outcome.ok,
        }
        if outcome.replayed:
            fields["replayed"] = True
        if failed:
            fields["repeated"] = failed
        self._audit("round_finished", **fields)
        if self.egress_path is not None:
            self._record_egress(outcome, server_round)
        eps = outcome.metrics.get(wire.DP_EPSILON_RUN)
        if eps is not None and not outcome.replayed:
            self._audit(
                "privacy_spent",
                run_id=run,
                round=server_round,
                epsilon_run=eps,
                epsilon_total=outcome.metrics.get(wire.DP_EPSILON_TOTAL),
            )
        self._say_trained(outcome, server_round)
        if not outcome.ok:
            self._audit(
                "error",
                run_id=run,
                round=server_round,
                reason=safe_reason(outcome.error),
            )

    def _remember_name(self, outcome: TaskOutcome) -> None:
        # the first name a run gave stays: a coordinator cannot rename a run's
        # earlier rows part-way through (each row also keeps the Flower run id)
        if not outcome.run_name or outcome.run_id in self.run_names:
            return
        self.run_names[outcome.run_id] = outcome.run_name
        while len(self.run_names) > RUN_NAMES_KEPT:  # a coordinator's many runs
            del self.run_names[next(iter(self.run_names))]

    def _audit(self, event: str, **fields: Any) -> None:
        try:
            self.audit.record(event, **fields)
        except (ValueError, DataError) as exc:  # auditing must not stop training
            log.error("could not write the audit log (%s): %s", event, exc)

    def _say_trained(self, outcome: TaskOutcome, server_round: int | None) -> None:
        """One line for the answer that carried this site's update.

        The handler's metrics (its wire version) mark it: SecAgg+ sends its other
        stages as train messages too, and those train nothing.
        """
        if self.say is None or not outcome.ok or outcome.message_type != "train":
            return
        if wire.WIRE_VERSION_KEY not in outcome.metrics:
            return
        try:
            self.say(training_line(outcome, server_round))
        except Exception:  # noqa: BLE001 - a closed terminal must not fail the task
            log.debug("could not print the round's line", exc_info=True)

    def _record_egress(self, outcome: TaskOutcome, server_round: int | None) -> None:
        from .egress_log import record_egress

        try:
            record_egress(
                self.egress_path,  # type: ignore[arg-type]
                run_id=outcome.run_name
                or self.run_names.get(outcome.run_id)
                or str(outcome.run_id),
                flower_run_id=outcome.run_id,
                server_round=server_round,
                message_type=outcome.message_type,
                ok=outcome.ok,
                bytes_in=outcome.bytes_in,
                bytes_out=outcome.bytes_out,
                seconds=outcome.seconds,
                tensors=outcome.tensors,
                metrics=outcome.metrics,
            )
        except OSError as exc:  # the record must not stop training
            log.error("could not write the egress log: %s", exc)


def training_line(outcome: TaskOutcome, server_round: int | None) -> str:
    """One line on a training answer the site sent: the run, the round, the cost."""
    # The run's name comes from the coordinator: printable text only, and quoted,
    # so that it cannot pass for the site's own words on the line.
    name = coordinator_label(outcome.run_name)
    where = f"run {json.dumps(name) if name else outcome.run_id}"
    if server_round is not None:
        where += f" round {server_round}"
    if outcome.replayed:
        return (
            f"{where}: asked again (a resumed round); the answer sent before was "
            f"sent again ({outcome.bytes_out:,} bytes): nothing trained, no ε spent"
        )
    line = (
        f"{where}: trained and answered in {outcome.seconds:.1f} s, "
        f"{outcome.bytes_out:,} bytes sent"
    )
    run_eps = outcome.metrics.get(wire.DP_EPSILON_RUN)
    total_eps = outcome.metrics.get(wire.DP_EPSILON_TOTAL)
    if isinstance(run_eps, int | float):
        line += f"; ε {run_eps:.2f} spent on this run"
        if isinstance(total_eps, int | float):
            line += f", {total_eps:.2f} over all runs"
    return line


def _round_of(group: str) -> int | None:
    """The round a message's Flower group id names, if it is a plain round number.

    The group id is the coordinator's text: ``"²".isdigit()`` is true and
    ``int("²")`` fails, so only ASCII digits of a sane length count.
    """
    if group.isascii() and group.isdigit() and len(group) <= 9:
        return int(group)
    return None


def run_site_daemon(
    plan: SitePlan,
    stop: threading.Event,
    report: Callable[[str], None] | None = None,
    on_locked: Callable[[], None] | None = None,
) -> None:
    """Run the SuperNode and the warm worker until ``stop`` is set or the node fails.

    ``report`` receives what the operator should see about the link to the
    coordinator (connected, not answering, answering again); by default it is
    logged as a warning. ``on_locked`` runs once this daemon holds the state
    folder (a refused second daemon announces nothing).

    A second daemon on the same state folder is refused: two SuperNodes with one
    key and one state would take each other's work and write one audit log. The
    privacy ledger may be shared (the same patients in two federations, each with
    its own key and state folder): its writes are locked, and sharing it is what
    composes their spends.
    """
    plan.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with sole_user(plan.state_dir, "site daemon"):
        if on_locked is not None:
            on_locked()
        _run_site_daemon(plan, stop, report or log.warning)


def _run_site_daemon(
    plan: SitePlan, stop: threading.Event, report: Callable[[str], None]
) -> None:
    env_before = dict(os.environ)
    os.environ["FLWR_HOME"] = str(plan.state_dir / "flwr-home")
    bypass_proxy_for_loopback(os.environ)  # the worker's calls to its SuperNode
    try:
        _serve_site(plan, stop, report)
    finally:
        os.environ.clear()
        os.environ.update(env_before)


def _serve_site(
    plan: SitePlan, stop: threading.Event, report: Callable[[str], None]
) -> None:
    apply_machine_hygiene(plan.state_dir)
    secret = load_or_create_secret(
        plan.state_dir / SUPEREXEC_SECRET_FILE, "the site's SuperExec secret"
    )
    audit = AuditLog(plan.state_dir / AUDIT_FILE, actor=f"site:{plan.site.site.name}")
    from .dashboard.app import start_site_dashboard

    dashboard = start_site_dashboard(plan.site, plan.site_toml, plan.check_report)
    node: _SuperNode | None = None
    worker: SiteWorker | None = None
    worker_thread: threading.Thread | None = None
    failure: FederationError | None = None
    ended_by = "stopped"
    try:
        port = plan.site.deployment.runtime_port or free_loopback_port()
        # another local account may listen on that port when the SuperNode is
        # down: the worker trusts only the certificate made here (runtime_tls.py)
        tls = issue_runtime_tls(plan.state_dir)
        env = dict(os.environ)
        env[POLL_ENV] = str(plan.site.deployment.poll_interval_s)
        if env.get("FLWR_LOG_LEVEL", "INFO").upper() not in ("INFO", "DEBUG"):
            # the connection's messages to the operator are read from INFO lines
            env["FLWR_LOG_LEVEL"] = "INFO"
        node = _SuperNode(
            plan, port, tls, env, audit, movable=not plan.site.deployment.runtime_port
        )
        audit.record(
            "site_daemon_started",
            coordinator=plan.coordinator,
            pid=os.getpid(),
            supernode_pid=node.process.pid,
            dashboard=dashboard.exposure.url if dashboard else "off",
        )
        _wait_for_port(node.port, node.process, tls)
        worker = SiteWorker(
            f"{RUNTIME_HOST}:{node.port}",
            AppApprovals(plan.state_dir),
            AuditingObserver(audit, plan.state_dir / EGRESS_FILE, say=report),
            superexec_secret=secret,
            runtime_ca_pem=tls.ca_pem,
        )
        # the worker follows the SuperNode to a port it moved to (_SuperNode.start)
        following = worker
        node.on_port = lambda moved_to: setattr(
            following, "runtime_api_address", f"{RUNTIME_HOST}:{moved_to}"
        )
        worker_thread = threading.Thread(
            target=worker.serve, args=(stop,), name="wardround-worker", daemon=True
        )
        worker_thread.start()
        watch = ConnectionWatch(plan.coordinator, str(node.log_path))
        failure = _supervise(node, worker_thread, stop, watch, report)
        if failure is not None:
            ended_by = safe_reason(failure.message)
    except BaseException as exc:
        ended_by = type(exc).__name__
        raise
    finally:
        stop.set()
        if node is not None:
            stop_child(node.process)
        if worker_thread is not None:
            worker_thread.join(timeout=30)
        if dashboard is not None:
            dashboard.stop()
        if node is not None:  # site_daemon_started was, or was about to be, recorded
            audit.record(
                "site_daemon_stopped",
                tasks=worker.tasks_run if worker is not None else 0,
                reason=ended_by,
            )
    if failure is not None:
        raise failure


def _supervise(
    node: _SuperNode,
    worker_thread: threading.Thread,
    stop: threading.Event,
    watch: ConnectionWatch,
    report: Callable[[str], None],
) -> FederationError | None:
    """Watch the SuperNode and the worker until ``stop``; why they ended, if they did."""
    while not stop.wait(0.5):
        for message in watch.feed(node.new_log_text(), time.monotonic()):
            report(message)
        if node.process.poll() is not None:
            delay = node.restart_delay()
            if isinstance(delay, FederationError):
                return delay
            if stop.wait(delay):
                return None
            node.start()
            continue
        if not worker_thread.is_alive():
            return FederationError(
                "the site's worker stopped",
                hint=f"See {node.log_path} and the daemon's log.",
            )
    return None


class _SuperNode:
    """The site's SuperNode process, restarted when it ends in a way that passes."""

    def __init__(
        self,
        plan: SitePlan,
        port: int,
        tls: RuntimeTls,
        env: dict[str, str],
        audit: AuditLog,
        *,
        movable: bool = False,
    ) -> None:
        self.plan, self.port, self.tls, self.env, self.audit = (
            plan,
            port,
            tls,
            env,
            audit,
        )
        # runtime-port unset: a port another process took is left for a free one
        self.movable = movable
        self.on_port: Callable[[int], None] = lambda port: None
        self.log_path = plan.state_dir / SUPERNODE_LOG
        self.first_refusal: float | None = None
        self.quick_exits = 0
        self.start()

    def start(self) -> None:
        """Start the SuperNode; its log is read from here on.

        When another process listens on its port (another account of the host may
        bind any loopback port while the SuperNode is down) and the port was not
        fixed, it moves to a free one, and the worker follows.
        """
        if self.movable and _port_taken(self.port):
            held, self.port = self.port, free_loopback_port()
            log.warning(
                "another process listens on the Runtime API port %s:%d; the "
                "SuperNode moves to %d",
                RUNTIME_HOST,
                held,
                self.port,
            )
            self.audit.record("runtime_port_moved", held_port=held, port=self.port)
            self.on_port(self.port)
        log_path = self.log_path
        self.offset = log_path.stat().st_size if log_path.exists() else 0
        self.watched_to = self.offset
        self.process = start_child(
            supernode_command(self.plan, self.port, self.tls), self.env, log_path
        )
        self.started = time.monotonic()

    def new_log_text(self) -> str:
        """The log's complete lines written since the last call."""
        try:
            with self.log_path.open("rb") as handle:
                if os.fstat(handle.fileno()).st_size < self.watched_to:
                    self.watched_to = self.offset = 0  # truncated (log rotation)
                handle.seek(self.watched_to)
                data = handle.read()
        except OSError:
            return ""
        complete = data[: data.rfind(b"\n") + 1]
        self.watched_to += len(complete)
        return complete.decode(errors="replace")

    def restart_delay(self) -> float | FederationError:
        """After the SuperNode exited: seconds to wait before a restart, or why not."""
        text = _read_from(self.log_path, self.offset)
        refusal = refusal_in(text)
        now = time.monotonic()
        ran_s = now - self.started
        if ran_s > _STABLE_S:
            self.first_refusal = None  # the last refusal was a passing one
            self.quick_exits = 0
        grace = self.plan.site.deployment.refusal_grace_s
        if refusal is not None and _KEY_REFUSED in text:
            self.first_refusal = self.first_refusal or now
            if now - self.first_refusal < grace:
                # A restarting coordinator registers its sites' keys again
                # within seconds: retry before calling the key refused.
                log.warning(
                    "%s; retrying (%.0f s left)",
                    refusal.message,
                    grace - (now - self.first_refusal),
                )
                return min(5.0, grace)
        elif refusal is None and self.quick_exits < _MAX_QUICK_EXITS:
            # Flower's SuperNode ends itself (exit 0) when a restarted SuperLink
            # no longer knows its node (heartbeat 401): a new one registers again.
            # Quick exits in a row back off, then give up.
            self.quick_exits += 1
            delay = min(_MAX_RESTART_DELAY_S, 2.0 ** (self.quick_exits - 1))
            code = self.process.returncode
            said = _last_error_line(text) if code else ""
            log.warning(
                "the SuperNode exited with code %s after %.0f s%s; "
                "starting it again in %.0f s (its log: %s)",
                code,
                ran_s,
                f", saying: {said}" if said else "",
                delay,
                self.log_path,
            )
            self.audit.record(
                "supernode_restarted", exit_code=code, ran_s=round(ran_s, 1)
            )
            return delay
        if refusal is None and _port_taken(self.port):
            where = f"{RUNTIME_HOST}:{self.port}"
            return FederationError(
                f"the SuperNode could not listen on its Runtime API port {where}: "
                "another process holds it"
                + (
                    f" (each of the {self.quick_exits} free ports it was given)"
                    if self.movable
                    else ""
                ),
                hint=f"See which with `ss -ltnp 'sport = :{self.port}'` and stop it"
                + (
                    "; another account of this host is taking the site's ports."
                    if self.movable
                    else ", or leave [deployment] runtime-port unset (the SuperNode "
                    "then moves to a free port)."
                )
                + " The worker never talks to it: it trusts only its own "
                "SuperNode's certificate.",
            )
        return refusal or FederationError(
            f"the SuperNode exited with code {self.process.returncode}"
            + (f", {self.quick_exits} times in a row" if self.quick_exits else ""),
            hint=f"See {self.log_path}.",
        )


def _wait_for_port(
    port: int, node: object, tls: RuntimeTls | None, limit_s: float = 60.0
) -> None:
    # The worker starts once the SuperNode's Runtime API answers (no retry noise):
    # with this start's certificate, so a process squatting the port does not count.
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and node.poll() is None:  # type: ignore[attr-defined]
        if tls is not None and serves_runtime_tls(port, tls, timeout_s=0.5):
            return
        if tls is None:
            try:
                with socket.create_connection((RUNTIME_HOST, port), timeout=0.5):
                    return
            except OSError:
                pass
        time.sleep(0.2)


def _port_taken(port: int) -> bool:
    """Whether some process listens on ``127.0.0.1:port`` (the SuperNode is down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # past TIME_WAIT connections; Linux still refuses a port someone listens on
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((RUNTIME_HOST, port))
        except OSError:
            return True
    return False


def _last_error_line(text: str) -> str:
    """The line of a SuperNode's log that says why it exited, for the terminal.

    The last line that reads as an error, else the last line; the cause (an
    address Flower cannot parse, a key it cannot read) is otherwise only in the
    log, while the terminal shows the retries' "connection refused".
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [
        line for line in lines if re.search(r"error|exception|unable", line, re.I)
    ]
    chosen = (errors or lines or [""])[-1]
    return chosen if len(chosen) <= 300 else chosen[:297] + "..."


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size < offset:
                offset = 0  # truncated since (log rotation): all of it is new
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""
