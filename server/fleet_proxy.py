"""nginx in front of the SuperLink: the public port answers Flower's Fleet API only.

Flower 1.41 serves its Fleet, Control and Runtime APIs from one HTTP server, under
``/v1/fleet/``, ``/v1/control/`` and ``/v1/runtime/``, with no flag to expose one
of them alone. The coordinator therefore binds the SuperLink to 127.0.0.1 and puts
nginx on the public port: it terminates TLS with the federation's certificate and
passes only POSTs to ``/v1/fleet/<call>`` on to the SuperLink. Everything else
(Control, Runtime, the OpenAPI pages, health, any other path or method) gets 404
or 403 from nginx and never reaches Flower.

nginx runs in the foreground (``daemon off``) as a child of the coordinator, which
stops it by PID. Its config, pid file, logs and temp files live in
``<state>/nginx/``; the access log records refused requests only.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from pathlib import Path

from ..common.errors import ConfigError
from .coordinator_config import CoordinatorConfig

NGINX_CONF = "nginx.conf"
NGINX_ERROR_LOG = "error.log"
NGINX_ACCESS_LOG = "refused.log"
FLEET_PREFIX = "/v1/fleet/"

PROXY_TIMEOUT_S = 300
"""Longer than any Fleet call: the SuperNode's HTTP client gives up after 30 s."""

INSTALL_HINT = (
    "Install nginx on the coordinator host (Debian/Ubuntu: "
    "`apt-get install nginx`; RHEL/Fedora: `dnf install nginx`), or set "
    "[coordinator] nginx to its path. The coordinator starts and stops it itself: "
    "leave the distribution's nginx service disabled (`systemctl disable --now "
    "nginx`) unless it serves other sites on other ports."
)

SYSTEM_NGINX = Path("/usr/sbin/nginx")
"""Where Debian, Ubuntu, RHEL and Fedora put nginx (not on a user's PATH)."""

# Characters that nginx reads as syntax or variables inside a quoted value.
_UNSAFE = set('"\\$;{}\n\r')


def find_nginx(config: CoordinatorConfig) -> str:
    """The nginx binary: ``[coordinator] nginx``, else on PATH, else /usr/sbin/nginx.

    Raises
    ------
    ConfigError
        If there is none: the coordinator never exposes the SuperLink itself.
    """
    configured = config.coordinator.nginx
    if configured:
        path = config.resolve(configured)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise ConfigError(
            f"[coordinator] nginx {path} is not an executable file", hint=INSTALL_HINT
        )
    found = shutil.which("nginx") or (
        str(SYSTEM_NGINX) if os.access(SYSTEM_NGINX, os.X_OK) else None
    )
    if found is None:
        raise ConfigError(
            "nginx is not installed: the coordinator puts it on the public port so "
            "that only the Fleet API (what sites need) is reachable from outside",
            hint=INSTALL_HINT,
        )
    return found


def _quoted(value: Path | str) -> str:
    text = str(value)
    bad = sorted(_UNSAFE & set(text))
    if bad:
        raise ConfigError(
            f"path {text!r} holds characters nginx cannot take: {''.join(bad)!r}",
            hint="Move the file or the state folder to a plain path.",
        )
    return f'"{text}"'


def _listen_address(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "*"):
        return str(port)
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _upstream_name(config: CoordinatorConfig) -> str:
    """The certificate's first DNS name: nginx checks the SuperLink's certificate."""
    from ..pki import describe_certificate

    names = describe_certificate(config.certificate_path).dns_names
    if not names:
        raise ConfigError(
            f"[tls] certificate {config.certificate_path} names no DNS host",
            hint="Issue it with `wardround certs server --host NAME --ip 127.0.0.1`.",
        )
    return names[0]


def _user_line() -> str:
    # Started as root (a container, a test), nginx would run its workers as
    # "nobody", who cannot write its temp folder in the 0700 state folder: keep
    # them on the daemon's own user. Not root: the directive is ignored.
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};\n"


def _fleet_location(config: CoordinatorConfig) -> str:
    """The server's one location open from outside: the Fleet API, proxied."""
    upstream_name = _upstream_name(config)
    return f"""        # Fleet calls are POST /v1/fleet/<call>: nothing else, no encoded or
        # relative forms, no query string.
        location {FLEET_PREFIX} {{
            if ($request_uri !~ "^/v1/fleet/[a-z0-9-]+$") {{
                return 404;
            }}
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host "{upstream_name}";
            proxy_ssl_server_name on;
            proxy_ssl_name "{upstream_name}";
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_trusted_certificate {_quoted(config.ca_path)};
            proxy_ssl_session_reuse on;
            proxy_connect_timeout 10s;
            proxy_send_timeout {PROXY_TIMEOUT_S}s;
            proxy_read_timeout {PROXY_TIMEOUT_S}s;
        }}"""


def nginx_conf(config: CoordinatorConfig) -> str:
    """The whole nginx config for this coordinator (text)."""
    prefix = config.nginx_path
    section = config.coordinator
    temp = prefix / "temp"
    return f"""# Written by `wardround coordinator start`: edit coordinator.toml instead.
{_user_line()}daemon off;
master_process on;
worker_processes 1;
pid {_quoted(prefix / "nginx.pid")};
error_log {_quoted(prefix / NGINX_ERROR_LOG)} warn;

events {{
    worker_connections 1024;
}}

http {{
    server_tokens off;
    client_body_temp_path {_quoted(temp / "body")};
    proxy_temp_path {_quoted(temp / "proxy")};
    fastcgi_temp_path {_quoted(temp / "fastcgi")};
    uwsgi_temp_path {_quoted(temp / "uwsgi")};
    scgi_temp_path {_quoted(temp / "scgi")};

    # Only what nginx refused (or the SuperLink failed) is logged.
    map $status $refused {{
        ~^[23] 0;
        default 1;
    }}
    log_format refused '$time_iso8601 $remote_addr "$request_method $uri" $status';
    access_log {_quoted(prefix / NGINX_ACCESS_LOG)} refused if=$refused;

    limit_conn_zone $binary_remote_addr zone=per_address:1m;

    upstream superlink {{
        server {config.internal_address};
        keepalive 16;
    }}

    server {{
        listen {_listen_address(section.host, section.port)} ssl;
        ssl_certificate {_quoted(config.certificate_path)};
        ssl_certificate_key {_quoted(config.private_key_path)};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:fleet:1m;

        # Flower reads a whole request into memory before it authenticates the
        # node: cap its size (one adapter object) and each address's connections.
        client_max_body_size {section.max_request_mb}m;
        limit_conn per_address {section.max_connections_per_address};
        proxy_request_buffering off;
        proxy_buffering off;

{_fleet_location(config)}

        # The Control API, the Runtime API, health, docs: never from outside.
        location / {{
            return 404;
        }}
    }}
}}
"""


def write_nginx_conf(config: CoordinatorConfig) -> Path:
    """Write ``<state>/nginx/nginx.conf`` (and nginx's folders); return its path."""
    prefix = config.nginx_path
    for folder in (prefix, prefix / "temp"):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = prefix / NGINX_CONF
    path.write_text(nginx_conf(config))
    return path


def nginx_command(config: CoordinatorConfig, binary: str) -> list[str]:
    """The nginx command line: its own prefix, config and early error log."""
    prefix = config.nginx_path
    return [
        binary,
        "-p",
        f"{prefix}/",
        "-c",
        str(prefix / NGINX_CONF),
        "-e",
        str(prefix / NGINX_ERROR_LOG),
    ]


def error_log_tail(config: CoordinatorConfig, lines: int = 5) -> str:
    """The last lines of nginx's error log ('' when there is none)."""
    try:
        text = (config.nginx_path / NGINX_ERROR_LOG).read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])
