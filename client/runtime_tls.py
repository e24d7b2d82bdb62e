"""TLS for the SuperNode's Runtime API, with a certificate made at each daemon start.

The site's worker asks its tasks of the SuperNode on a loopback port. Any account on
the site host may bind a loopback port: while the SuperNode restarts (the coordinator
restarted, say), or before the daemon starts when ``[deployment] runtime-port`` is
fixed, another account could listen there, hand the worker tasks of its own making
and take its answers. The daemon therefore makes a CA and a server certificate for
127.0.0.1 at every start; the SuperNode serves its Runtime API with them, and the
worker trusts that CA alone. The CA's key is dropped as soon as it has signed, and
the server key is kept in the state folder (0700, the file 0600) only because the
SuperNode reads it from a file: no other process can show that certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import socket
import ssl
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from ..pki.certificates import (
    build_ca_certificate,
    build_server_certificate,
    certificate_pem,
    new_private_key,
    private_key_pem,
)

RUNTIME_TLS_DIR = "runtime-tls"
RUNTIME_HOST = "127.0.0.1"
_VALID_DAYS = 3650  # the daemon's lifetime at most; a new pair at every start
_PRIVATE = 0o600


@dataclass(frozen=True)
class RuntimeTls:
    """The files the SuperNode serves with, and the CA the worker trusts."""

    ca_pem: bytes
    ca_certificate: Path
    certificate: Path
    private_key: Path

    def supernode_args(self) -> list[str]:
        """Flower 1.41's ``flower-supernode`` options for a Runtime API over TLS."""
        return [
            "--ssl-certfile",
            str(self.certificate),
            "--ssl-keyfile",
            str(self.private_key),
            "--ssl-ca-certfile",
            str(self.ca_certificate),
        ]


def issue_runtime_tls(state_dir: Path, now: dt.datetime | None = None) -> RuntimeTls:
    """A fresh CA and 127.0.0.1 certificate in ``state_dir/runtime-tls``."""
    folder = Path(state_dir) / RUNTIME_TLS_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    when = now or dt.datetime.now(dt.UTC)
    ca_key = new_private_key()
    ca = build_ca_certificate(ca_key, "wardround site runtime API", _VALID_DAYS, when)
    key = new_private_key()
    cert = build_server_certificate(
        key.public_key(),
        ca,
        ca_key,
        ["localhost"],
        [ipaddress.ip_address(RUNTIME_HOST)],
        _VALID_DAYS,
        when,
    )
    ca_pem = certificate_pem(ca)
    tls = RuntimeTls(
        ca_pem=ca_pem,
        ca_certificate=folder / "ca.pem",
        certificate=folder / "runtime.pem",
        private_key=folder / "runtime.key",
    )
    _write_private(tls.private_key, private_key_pem(key))
    _write_private(tls.certificate, certificate_pem(cert))
    _write_private(tls.ca_certificate, ca_pem)
    return tls


def bypass_proxy_for_loopback(environ: MutableMapping[str, str]) -> None:
    """Calls to 127.0.0.1 go direct, whatever proxy the host sets for the internet.

    Flower's Runtime API client is httpx, which sends an ``https://`` call through
    ``HTTPS_PROXY`` unless ``NO_PROXY`` lists the host: a hospital's outbound proxy
    would otherwise stand between the worker and its own SuperNode.
    """
    # Python's lookup (which httpx and requests use) prefers the lowercase name,
    # other tools the uppercase one: both get one list, keeping either's entries
    listed: list[str] = []
    for name in ("NO_PROXY", "no_proxy"):
        for host in environ.get(name, "").split(","):
            if host.strip() and host.strip() not in listed:
                listed.append(host.strip())
    listed += [h for h in (RUNTIME_HOST, "localhost") if h not in listed]
    environ["NO_PROXY"] = environ["no_proxy"] = ",".join(listed)


def serves_runtime_tls(port: int, tls: RuntimeTls, timeout_s: float = 2.0) -> bool:
    """Whether what listens on ``port`` shows this start's certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=tls.ca_pem.decode("ascii"))
    try:
        with socket.create_connection((RUNTIME_HOST, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=RUNTIME_HOST):
                return True
    except (OSError, ssl.SSLError):
        return False


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _PRIVATE)
    try:
        os.fchmod(fd, _PRIVATE)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
