"""A whole deployed federation on 127.0.0.1: PKI, coordinator and site daemons.

Used by the loopback deployment tests and the deployment benchmark: it writes a CA,
a server certificate, site keys, synthetic sites with a ``[deployment]`` section and
a ``coordinator.toml``, then starts every process through the ``wardround`` CLI, as
an operator would, and stops them by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from wardround.ops.processes import stop_processes
from wardround.pki import (
    generate_site_keypair,
    init_ca,
    issue_server_certificate,
)

WARDROUND = [sys.executable, "-m", "wardround.cli"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass
class Daemon:
    """A daemon started through the ``wardround`` CLI, and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def family(self) -> list[psutil.Process]:
        """The daemon and every process it started."""
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.Error:
            return []

    def output(self) -> str:
        """Everything the daemon printed so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class LoopbackFederation:
    """PKI, a coordinator and site daemons on 127.0.0.1, in one folder."""

    root: Path
    port: int
    internal_port: int
    site_names: list[str]
    dashboard_port: int = 0
    """The coordinator's dashboard and /metrics (127.0.0.1)."""
    site_dashboard_ports: dict[str, int] = field(default_factory=dict)
    daemons: dict[str, Daemon] = field(default_factory=dict)
    started: list[psutil.Process] = field(default_factory=list)

    # -- files -----------------------------------------------------------------
    @property
    def coordinator_toml(self) -> Path:
        """The coordinator's config file."""
        return self.root / "coordinator.toml"

    @property
    def state(self) -> Path:
        """The coordinator's state folder."""
        return self.root / "coordinator-state"

    def site_toml(self, name: str) -> Path:
        """A site's site.toml."""
        return self.root / "sites" / name / "site.toml"

    def site_state(self, name: str) -> Path:
        """A site daemon's state folder."""
        return self.root / "site-state" / name

    @classmethod
    def create(cls, root: Path, sites: int = 3) -> LoopbackFederation:
        """Write a CA, a server certificate, site keys, synthetic sites and configs."""
        port, internal_port, dashboard_port = free_port(), free_port(), free_port()
        while len({port, internal_port, dashboard_port}) < 3:
            internal_port, dashboard_port = free_port(), free_port()
        init_ca(root / "pki")
        issue_server_certificate(
            root / "pki", ["localhost"], ["127.0.0.1"], root / "pki"
        )
        (root / "coordinator.toml").write_text(
            "[coordinator]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f"internal-port = {internal_port}\n"
            'state-dir = "coordinator-state"\n'
            "[tls]\n"
            'ca-certificate = "pki/ca.pem"\n'
            'certificate = "pki/coordinator.pem"\n'
            'private-key = "pki/coordinator.key"\n'
            "[dashboard]\n"
            f"port = {dashboard_port}\n"
            "refresh-s = 2\n"
        )
        # imported where the hospitals are written: the generator is not needed else
        from wardround.synthetic.hospitals import synthesize_federation

        synthesize_federation(root / "sites", sites, patients_per_site=40, seed=5)
        names = sorted(p.parent.name for p in (root / "sites").glob("*/site.toml"))
        federation = cls(
            root=root,
            port=port,
            internal_port=internal_port,
            site_names=names,
            dashboard_port=dashboard_port,
        )
        for name in names:
            generate_site_keypair(name, root / "keys")
            federation.add_deployment(name, key=root / "keys" / f"{name}.key")
        return federation

    def add_deployment(
        self,
        name: str,
        key: Path,
        ca: Path | None = None,
        refusal_grace_s: float = 120.0,
    ) -> None:
        """(Re)write a site's ``[deployment]`` and ``[dashboard]`` (key, CA, fast polling)."""
        site_toml = self.site_toml(name)
        taken = {self.port, self.internal_port, self.dashboard_port}
        taken |= set(self.site_dashboard_ports.values())
        if name not in self.site_dashboard_ports:
            dashboard = free_port()
            while dashboard in taken:
                dashboard = free_port()
            self.site_dashboard_ports[name] = dashboard
        text = site_toml.read_text().split("\n[deployment]")[0]
        text = text.replace("budget-epsilon = 100.0", "budget-epsilon = 1000000.0")
        site_toml.write_text(
            text + "\n[deployment]\n"
            f'coordinator = "127.0.0.1:{self.port}"\n'
            f'root-certificate = "{ca or self.root / "pki" / "ca.pem"}"\n'
            f'private-key = "{key}"\n'
            f'state-dir = "{self.site_state(name)}"\n'
            "poll-interval-s = 0.2\n"
            f"refusal-grace-s = {refusal_grace_s}\n"
            "[dashboard]\n"
            f"port = {self.site_dashboard_ports[name]}\n"
            "refresh-s = 2\n"
        )

    # -- processes -------------------------------------------------------------
    def _start(self, key: str, args: list[str]) -> Daemon:
        log = self.root / "logs" / f"{key}.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                [*WARDROUND, *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ),
            )
        daemon = Daemon(key, proc, log)
        self.daemons[key] = daemon
        self.started.append(psutil.Process(proc.pid))
        return daemon

    def start_coordinator(self) -> Daemon:
        """Start ``wardround coordinator start`` and wait until it is ready."""
        daemon = self._start(
            "coordinator",
            ["coordinator", "start", "--config", str(self.coordinator_toml)],
        )
        wait_for(
            lambda: (
                "coordinator: ready" in daemon.output()
                or daemon.proc.poll() is not None
            ),
            90,
            "the coordinator",
        )
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the coordinator exited:\n{daemon.output()[-3000:]}")
        return daemon

    def start_site(self, name: str) -> Daemon:
        """Start ``wardround site start`` for one site."""
        return self._start(
            name, ["site", "start", "--config", str(self.site_toml(name))]
        )

    def kill(self, key: str) -> None:
        """SIGKILL a daemon (its SuperLink/SuperNode dies with it)."""
        daemon = self.daemons[key]
        family = daemon.family()
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(timeout=30)
        psutil.wait_procs(family[1:], timeout=30)

    def stop(self, key: str) -> int:
        """SIGTERM a daemon and return its exit code."""
        daemon = self.daemons[key]
        daemon.proc.send_signal(signal.SIGTERM)
        return daemon.proc.wait(timeout=60)

    def stop_all(self) -> list[int]:
        """Stop every daemon and its children by PID; return the PIDs."""
        family: list[psutil.Process] = []
        for daemon in self.daemons.values():
            family.extend(daemon.family())
        return stop_processes(family, grace_s=20)

    # -- admin -----------------------------------------------------------------
    def cli(
        self, *args: str, timeout_s: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run one ``wardround`` command in the federation's folder."""
        return subprocess.run(
            [*WARDROUND, *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.root,
            env=dict(os.environ),
        )

    def enrol(
        self, name: str, key: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``wardround sites add`` a site with its public key (default: the one create() made)."""
        return self.cli(
            "sites",
            "add",
            name,
            "--key",
            str(key or self.root / "keys" / f"{name}.pub"),
            "--config",
            str(self.coordinator_toml),
        )

    def sites_online(self) -> dict[str, str]:
        """Each enrolled site's state as ``wardround sites list`` reports it."""
        result = self.cli(
            "sites", "list", "--config", str(self.coordinator_toml), "--json"
        )
        if result.returncode != 0:
            return {}
        return {row["site"]: row["state"] for row in json.loads(result.stdout)}

    def wait_online(self, names: list[str], timeout_s: float = 120) -> None:
        """Wait until the named sites are online at the coordinator."""
        wait_for(
            lambda: all(self.sites_online().get(n) == "online" for n in names),
            timeout_s,
            f"sites {names} online",
            poll_s=2,
        )

    def app_hash(self, run_toml: Path) -> str:
        """The app hash of a run config (``launch --print-hash``)."""
        result = self.cli(
            "launch",
            "--config",
            str(run_toml),
            "--coordinator",
            str(self.coordinator_toml),
            "--print-hash",
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        return result.stdout.strip()

    def approve(self, app_hash: str, names: list[str]) -> None:
        """Approve an app hash at the named sites."""
        for name in names:
            result = self.cli(
                "site", "approve", app_hash, "--config", str(self.site_toml(name))
            )
            if result.returncode != 0:
                raise RuntimeError(result.stderr)

    def run_toml(self, name: str, text: str) -> Path:
        """Write a run config into the federation's folder."""
        path = self.root / name
        path.write_text(text)
        return path

    def run_dirs(self) -> list[Path]:
        """The coordinator's run directories."""
        runs = self.state / "runs"
        return (
            sorted(p for p in runs.iterdir() if (p / "launch.json").exists())
            if runs.exists()
            else []
        )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
