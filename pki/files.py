"""Writing the PKI's files: the CA, the coordinator's TLS certificate, site keys.

Private keys are written 0600, and no file is replaced unless forced.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from wardround.common.errors import ConfigError

from .certificates import (
    build_ca_certificate,
    build_server_certificate,
    certificate_pem,
    new_private_key,
    private_key_pem,
    site_key_openssh,
    utc_now,
)
from .loading import load_ca
from .names import (
    CA_CERT_NAME,
    CA_KEY_NAME,
    PRIVATE_MODE,
    PUBLIC_MODE,
    validate_days,
    validate_hosts,
    validate_ips,
    validate_name,
)


@dataclass(frozen=True)
class CaFiles:
    """Where :func:`init_ca` wrote the CA."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerFiles:
    """Where :func:`issue_server_certificate` wrote the server certificate."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class SiteKeyFiles:
    """Where :func:`generate_site_keypair` wrote a site's key pair."""

    private_key: Path
    public_key: Path


def init_ca(
    out_dir: Path | str,
    common_name: str = "wardround CA",
    days: int = 3650,
    *,
    force: bool = False,
    now: dt.datetime | None = None,
) -> CaFiles:
    """Create a CA: ``ca.pem`` (certificate) and ``ca.key`` (private key, 0600).

    Parameters
    ----------
    out_dir
        Folder for the two files; created if missing.
    common_name
        The CA's subject CN.
    days
        Validity from now.
    force
        Replace existing files; without it an existing file is an error.
    now
        The issue time (UTC); the current time when omitted.

    Raises
    ------
    ConfigError
        If a file exists and ``force`` is false, or an input is invalid.
    """
    if not common_name.strip():
        raise ConfigError(
            "the CA common name is empty", hint="pass e.g. --name 'wardround CA'"
        )
    validate_days(days)
    out = Path(out_dir)
    files = CaFiles(cert=out / CA_CERT_NAME, key=out / CA_KEY_NAME)
    _refuse_overwrite([files.cert, files.key], force)
    key = new_private_key()
    cert = build_ca_certificate(key, common_name, days, utc_now(now))
    out.mkdir(parents=True, exist_ok=True)
    # Key first: a certificate without its key is useless, the reverse is recoverable.
    _write(files.key, private_key_pem(key), PRIVATE_MODE, force)
    _write(files.cert, certificate_pem(cert), PUBLIC_MODE, force)
    return files


def issue_server_certificate(
    ca_dir: Path | str,
    hosts: list[str],
    ips: list[str],
    out_dir: Path | str,
    name: str = "coordinator",
    days: int = 825,
    *,
    force: bool = False,
    now: dt.datetime | None = None,
) -> ServerFiles:
    """Issue a TLS server certificate signed by the CA in ``ca_dir``.

    Writes ``<name>.pem`` and ``<name>.key`` (0600) into ``out_dir`` and nothing else.

    Parameters
    ----------
    ca_dir
        Folder holding ``ca.pem`` and ``ca.key`` (from :func:`init_ca`).
    hosts
        DNS names the certificate is valid for (at least one); the first is the CN.
    ips
        IP addresses the certificate is valid for.
    out_dir
        Folder for the two files; created if missing.
    name
        Base name of the two files.
    days
        Validity from now; 825 days is the longest most TLS clients accept.
    force
        Replace existing files; without it an existing file is an error.
    now
        The issue time (UTC); the current time when omitted.

    Raises
    ------
    ConfigError
        On an invalid host, IP, name or validity, a missing or unusable CA, or an
        existing file without ``force``.
    """
    validate_name(name, "certificate name")
    dns_names = validate_hosts(list(hosts))
    ip_addresses = validate_ips(list(ips))
    validate_days(days)
    out = Path(out_dir)
    files = ServerFiles(cert=out / f"{name}.pem", key=out / f"{name}.key")
    ca_cert, ca_key = load_ca(ca_dir)
    if files.key.resolve() == (Path(ca_dir) / CA_KEY_NAME).resolve():
        raise ConfigError(
            f"--name {name} in {out} would replace the CA's own files",
            hint="pick another --name, e.g. coordinator",
        )
    _refuse_overwrite([files.cert, files.key], force)
    issued = utc_now(now)
    _within_ca_validity(ca_cert, issued, days)
    key = new_private_key()
    cert = build_server_certificate(
        key.public_key(), ca_cert, ca_key, dns_names, ip_addresses, days, issued
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(files.key, private_key_pem(key), PRIVATE_MODE, force)
    _write(files.cert, certificate_pem(cert), PUBLIC_MODE, force)
    return files


def _within_ca_validity(
    ca_cert: x509.Certificate, issued: dt.datetime, days: int
) -> None:
    """Refuse a certificate that would outlive its CA (or a CA that has expired).

    Clients stop trusting it when the CA expires, whatever its own dates say.
    """
    ca_end = ca_cert.not_valid_after_utc
    left = (ca_end - issued).days
    if left < 1:
        raise ConfigError(
            f"the CA expired on {ca_end:%Y-%m-%d}"
            if ca_end <= issued
            else f"the CA expires on {ca_end:%Y-%m-%d}, in less than a day",
            hint="Make a new CA (`wardround certs init`) and re-issue every "
            "certificate from it (deploy/README.md, Certificate rotation).",
        )
    if issued + dt.timedelta(days=days) > ca_end:
        raise ConfigError(
            f"--days {days} would keep the certificate valid after its CA expires "
            f"({ca_end:%Y-%m-%d}); clients stop trusting it then",
            hint=f"Give --days {left} or fewer, or renew the CA first.",
        )


def generate_site_keypair(
    name: str, out_dir: Path | str, *, force: bool = False
) -> SiteKeyFiles:
    """Create a site's SuperNode authentication key pair (EC P-384, OpenSSH format).

    Writes ``<name>.key`` (0600; the SuperNode's ``--auth-supernode-private-key``)
    and ``<name>.pub`` (registered at the SuperLink; its comment is ``name``).

    Raises
    ------
    ConfigError
        On an invalid ``name`` or an existing file without ``force``.
    """
    validate_name(name, "site name")
    out = Path(out_dir)
    files = SiteKeyFiles(
        private_key=out / f"{name}.key", public_key=out / f"{name}.pub"
    )
    _refuse_overwrite([files.private_key, files.public_key], force)
    private, public = site_key_openssh(new_private_key(), name)
    out.mkdir(parents=True, exist_ok=True)
    _write(files.private_key, private, PRIVATE_MODE, force)
    _write(files.public_key, public, PUBLIC_MODE, force)
    return files


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    # Checked for all files before writing any, so a refusal leaves nothing half done.
    if force:
        return
    for path in paths:
        if path.exists():
            raise ConfigError(
                f"{path} already exists",
                hint="add --force to the command to replace it; anything that trusts or "
                "uses the old file will need the new one",
            )


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` with permissions ``mode`` from the first byte on."""
    if not force:
        # O_EXCL: never follow or clobber a file that appeared since the check.
        _write_new(path, data, mode)
        return
    # Replace through a fresh file: truncating the old one in place would keep its
    # (possibly wider) permissions, and a reader never sees a half-written file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_new(temporary, data, mode)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        # The umask may have narrowed ``mode``; set it exactly (it never widens a
        # private key beyond 0600).
        os.fchmod(handle.fileno(), mode)
        handle.write(data)
