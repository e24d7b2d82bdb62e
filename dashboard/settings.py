"""The ``[dashboard]`` section of ``coordinator.toml`` and of ``site.toml``."""

from __future__ import annotations

from pydantic import Field

from ..common.config import _Section


class DashboardSection(_Section):
    """Where a daemon serves its dashboard and ``/metrics`` (read-only).

    Loopback by default. Another ``host`` needs ``token-file`` and TLS; the
    coordinator serves it with its ``[tls]`` certificate and key.
    """

    enabled: bool = Field(True, description="serve the dashboard and /metrics")
    host: str = Field(
        "127.0.0.1",
        description="bind address; anything but loopback needs token-file and TLS",
    )
    port: int = Field(9095, ge=1, le=65535, description="the dashboard's port")
    token_file: str = Field(
        "",
        description="a file (0600) holding the token asked of every request; "
        "required off loopback",
    )
    refresh_s: int = Field(
        5, ge=0, le=3600, description="live pages reload this often (0: never)"
    )


class SiteDashboardSection(DashboardSection):
    """The site's dashboard: as the coordinator's, with its own TLS files off loopback."""

    port: int = Field(9096, ge=1, le=65535, description="the dashboard's port")
    certificate: str = Field(
        "",
        description="TLS certificate when host is not loopback "
        "(e.g. from `wardround certs server`)",
    )
    private_key: str = Field("", description="the certificate's private key (0600)")
