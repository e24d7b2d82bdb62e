"""``coordinator.toml``: where the coordinator listens, its TLS files and its state.

Relative paths are resolved against the folder holding the file. The state folder
holds the enrolled sites (``sites.json``), the runs (``runs/<name>/``), the audit
log (``audit.jsonl``), the private ``FLWR_HOME`` the admin commands use to reach
the SuperLink, the SuperExec secret and nginx's files (``nginx/``).

Two ports: ``port`` on ``host`` is public and answers only Flower's Fleet API
(nginx in front); ``internal-port`` on 127.0.0.1 is the SuperLink itself, with its
Control and Runtime APIs, reachable from the coordinator host only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from ..common.config import _Section
from ..dashboard.settings import DashboardSection
from ..ops.addresses import HOST_PORT, is_host
from ..ops.config_file import TomlFileConfig

FEDERATION_NAME = "wardround"
"""The name under which the admin commands know the coordinator's SuperLink."""


class CoordinatorSection(_Section):
    """Where the coordinator listens and keeps its state."""

    host: str = Field("0.0.0.0", description="bind address of the public port")
    port: int = Field(
        9093,
        ge=1,
        le=65535,
        description="the one public port sites connect to: the Fleet API only",
    )
    internal_port: int = Field(
        9094,
        ge=1,
        le=65535,
        description="the SuperLink's own port, on 127.0.0.1 only (admin commands)",
    )
    admin_address: str = Field(
        "",
        description="host:port the admin commands use to reach the SuperLink "
        "(default 127.0.0.1:internal-port); a loopback name in the server certificate",
    )
    nginx: str = Field(
        "",
        description="the nginx binary in front of the SuperLink "
        "(default: nginx on PATH, then /usr/sbin/nginx)",
    )
    max_request_mb: int = Field(
        1024,
        ge=1,
        le=65_536,
        description="the largest request the public port accepts (one adapter "
        "object); larger ones are refused before they reach the SuperLink",
    )
    max_connections_per_address: int = Field(
        64,
        ge=1,
        le=100_000,
        description="open connections one address may hold on the public port",
    )
    state_dir: str = "coordinator-state"

    @field_validator("host")
    @classmethod
    def _an_address(cls, host: str) -> str:
        if host in ("", "*") or is_host(host):
            return host
        raise ValueError(
            f"{host!r} is not an address to listen on: give an IP address or a host "
            "name without a scheme or port (0.0.0.0 for every address; the port is "
            "[coordinator] port)"
        )

    @field_validator("admin_address")
    @classmethod
    def _host_port(cls, address: str) -> str:
        if address and not HOST_PORT.fullmatch(address):
            raise ValueError(
                f"{address!r}: give HOST:PORT without a scheme or path, e.g. "
                "127.0.0.1:9094"
            )
        return address

    @model_validator(mode="after")
    def _two_ports(self) -> CoordinatorSection:
        if self.internal_port == self.port:
            raise ValueError(
                f"internal-port {self.internal_port} must differ from port: the "
                "public port answers the Fleet API only"
            )
        return self


class TlsSection(_Section):
    """The SuperLink's TLS files (``wardround certs init`` / ``certs server``)."""

    ca_certificate: str
    certificate: str
    private_key: str


class CoordinatorConfig(TomlFileConfig):
    """A parsed ``coordinator.toml``."""

    coordinator: CoordinatorSection = CoordinatorSection()
    tls: TlsSection
    dashboard: DashboardSection = DashboardSection()
    toml_hint: ClassVar[str] = "See deploy/README.md for an example coordinator.toml."

    def resolve(self, relative: str) -> Path:
        """Resolve a path from the file against its folder."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def state_path(self) -> Path:
        """The state folder, resolved."""
        return self.resolve(self.coordinator.state_dir)

    @property
    def admin_address(self) -> str:
        """host:port for the admin commands: the SuperLink's loopback port."""
        return (
            self.coordinator.admin_address
            or f"127.0.0.1:{self.coordinator.internal_port}"
        )

    @property
    def internal_address(self) -> str:
        """Where the SuperLink listens: loopback, the internal port."""
        return f"127.0.0.1:{self.coordinator.internal_port}"

    @property
    def superexec_secret_path(self) -> Path:
        """The SuperExec HMAC secret (0600), written afresh at each start."""
        return self.state_path / "superexec.secret"

    @property
    def nginx_path(self) -> Path:
        """The prefix of nginx: its config, pid file, logs and temp files."""
        return self.state_path / "nginx"

    @property
    def ca_path(self) -> Path:
        """The CA certificate, resolved."""
        return self.resolve(self.tls.ca_certificate)

    @property
    def certificate_path(self) -> Path:
        """The server certificate, resolved."""
        return self.resolve(self.tls.certificate)

    @property
    def private_key_path(self) -> Path:
        """The server's private key, resolved."""
        return self.resolve(self.tls.private_key)

    @property
    def flwr_home(self) -> Path:
        """The private FLWR_HOME of the admin commands and the SuperLink."""
        return self.state_path / "flwr-home"

    @property
    def runs_path(self) -> Path:
        """Where the ServerApp writes each run's directory."""
        return self.state_path / "runs"

    @property
    def audit_path(self) -> Path:
        """The coordinator's audit log."""
        return self.state_path / "audit.jsonl"

    @property
    def sites_path(self) -> Path:
        """The enrolled sites."""
        return self.state_path / "sites.json"

    @property
    def dashboard_token_path(self) -> Path | None:
        """The dashboard's token file, resolved (None: no token)."""
        token = self.dashboard.token_file
        return self.resolve(token) if token else None
