"""A small PKI for a federation: CA, coordinator TLS certificate, site keys.

Flower's SuperLink serves TLS with ``--ssl-ca-certfile ca.pem --ssl-certfile
coordinator.pem --ssl-keyfile coordinator.key``; SuperNodes check it with
``--root-certificates ca.pem`` and authenticate with an EC key pair in OpenSSH format
(``--auth-supernode-private-key site.key``; the ``.pub`` is registered at the
SuperLink).

The ``build_*`` functions are pure: they turn keys and names into x509 objects.
The other public functions read and write files around them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wardround.common.errors import ConfigError

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
EXPIRY_WARNING_DAYS = 30

# P-384 for every key: Flower accepts NIST curves for SuperNode keys, and gRPC
# (BoringSSL) and OpenSSL both serve ECDSA P-384 certificates.
_CURVE = ec.SECP384R1
_SIGNATURE_HASH = hashes.SHA384
# Certificates start a few minutes in the past so a peer whose clock runs slightly
# behind does not reject a certificate issued a moment ago.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


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


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator needs to know about one certificate file.

    Attributes
    ----------
    subject_cn, issuer_cn
        Common names (the full RFC 4514 name when there is no CN).
    not_before, not_after
        Validity bounds, timezone-aware UTC.
    days_left
        Whole days until ``not_after``, rounded down (a fresh 10-day certificate
        shows 9); negative once expired.
    sha256_fingerprint
        SHA-256 of the DER certificate, lowercase hex.
    key_type
        E.g. ``"EC secp384r1"`` or ``"RSA 2048"``.
    """

    path: Path
    subject_cn: str
    issuer_cn: str
    is_ca: bool
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    days_left: int
    sha256_fingerprint: str
    key_type: str

    def to_dict(self) -> dict[str, object]:
        """The fields as JSON-ready values (ISO 8601 datetimes, string path)."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["dns_names"] = list(self.dns_names)
        data["ip_addresses"] = list(self.ip_addresses)
        data["not_before"] = self.not_before.isoformat()
        data["not_after"] = self.not_after.isoformat()
        return data


# --------------------------------------------------------------------------- inputs


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is 1..64 letters, digits, ``-`` or ``_``.

    Raises
    ------
    ConfigError
        Naming the rejected value; such names become file names and key comments.
    """
    if not _NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"invalid {what} {name!r}: use 1 to 64 letters, digits, '-' or '_'"
        )
    return name


def validate_hosts(hosts: list[str]) -> list[str]:
    """Return the DNS names in ``hosts``, without duplicates, in order.

    Raises
    ------
    ConfigError
        If the list is empty or a value is not a DNS name (an IP address belongs in
        ``ips``, because TLS clients match IPs only against IP SAN entries).
    """
    if not hosts:
        raise ConfigError(
            "a server certificate needs at least one host name",
            hint="pass the name sites connect to, e.g. --host localhost",
        )
    for host in hosts:
        if _is_ip(host):
            raise ConfigError(
                f"host {host!r} is an IP address", hint=f"pass it as --ip {host}"
            )
        labels = host.removeprefix("*.").split(".")
        if len(host) > 253 or not all(_DNS_LABEL.fullmatch(lab) for lab in labels):
            raise ConfigError(
                f"invalid host name {host!r}: use letters, digits, '-' and dots "
                "(ASCII; convert internationalised names to their xn-- form)"
            )
    return list(dict.fromkeys(host.lower() for host in hosts))


def validate_ips(ips: list[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Parse ``ips`` as IPv4/IPv6 addresses, without duplicates, in order.

    Raises
    ------
    ConfigError
        Naming the first value that is not an IP address.
    """
    parsed = []
    for value in ips:
        try:
            parsed.append(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ConfigError(
                f"invalid IP address {value!r}",
                hint="use a literal address such as 127.0.0.1 or ::1; "
                "host names go in --host",
            ) from None
    return list(dict.fromkeys(parsed))


def _validate_days(days: int) -> int:
    if days < 1:
        raise ConfigError(f"invalid validity of {days} days: use 1 or more")
    return days


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------ pure builders


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-384 private key."""
    return ec.generate_private_key(_CURVE())


def build_ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    days: int,
    now: dt.datetime,
) -> x509.Certificate:
    """A self-signed CA certificate for ``key``, valid ``days`` from ``now``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: this CA signs server certificates, never other CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .sign(key, _SIGNATURE_HASH())
    )


def build_server_certificate(
    server_public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    days: int,
    now: dt.datetime,
) -> x509.Certificate:
    """A TLS server certificate for ``hosts`` and ``ips``, signed by the CA.

    ``hosts`` and ``ips`` are taken as already validated (see :func:`validate_hosts`
    and :func:`validate_ips`).
    """
    alt_names: list[x509.GeneralName] = [x509.DNSName(host) for host in hosts]
    alt_names += [x509.IPAddress(ip) for ip in ips]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(server_public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_public_key),
            critical=False,
        )
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
        .sign(ca_key, _SIGNATURE_HASH())
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # Reuse the CA's own SKI when it has one, so chain builders match them byte for
    # byte even if the CA was made by another tool with another SKI method.
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM, the form gRPC and OpenSSL load."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    """``cert`` as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def site_key_openssh(key: ec.EllipticCurvePrivateKey, name: str) -> tuple[bytes, bytes]:
    """``(private, public)`` OpenSSH encodings of a site key; ``name`` is the comment."""
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b" " + name.encode("ascii") + b"\n"


def describe(
    cert: x509.Certificate, path: Path, now: dt.datetime | None = None
) -> CertificateInfo:
    """The :class:`CertificateInfo` of a loaded certificate, days counted from ``now``."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = tuple(san.value.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.value.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ips = (), ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    not_after = cert.not_valid_after_utc
    return CertificateInfo(
        path=path,
        subject_cn=_common_name(cert.subject),
        issuer_cn=_common_name(cert.issuer),
        is_ca=is_ca,
        dns_names=dns_names,
        ip_addresses=ips,
        not_before=cert.not_valid_before_utc,
        not_after=not_after,
        # timedelta.days floors, so an expired certificate has a negative count.
        days_left=(not_after - now).days,
        sha256_fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        key_type=_key_type(cert.public_key()),
    )


def expiry_warning(
    info: CertificateInfo, warn_days: int = EXPIRY_WARNING_DAYS
) -> str | None:
    """A warning when ``info`` has expired or has fewer than ``warn_days`` left."""
    when = info.not_after.strftime("%Y-%m-%d %H:%M UTC")
    if info.days_left < 0:
        return f"{info.path} expired on {when}"
    if info.days_left < warn_days:
        return f"{info.path} expires in {info.days_left} day(s), on {when}"
    return None


def _common_name(name: x509.Name) -> str:
    attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attributes[0].value) if attributes else name.rfc4514_string()


def _key_type(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(public_key).__name__


# ------------------------------------------------------------------ file writing


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
    _validate_days(days)
    out = Path(out_dir)
    files = CaFiles(cert=out / CA_CERT_NAME, key=out / CA_KEY_NAME)
    _refuse_overwrite([files.cert, files.key], force)
    key = new_private_key()
    cert = build_ca_certificate(key, common_name, days, _utc(now))
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
    _validate_days(days)
    out = Path(out_dir)
    files = ServerFiles(cert=out / f"{name}.pem", key=out / f"{name}.key")
    ca_cert, ca_key = load_ca(ca_dir)
    if files.key.resolve() == (Path(ca_dir) / CA_KEY_NAME).resolve():
        raise ConfigError(
            f"--name {name} in {out} would replace the CA's own files",
            hint="pick another --name, e.g. coordinator",
        )
    _refuse_overwrite([files.cert, files.key], force)
    key = new_private_key()
    cert = build_server_certificate(
        key.public_key(), ca_cert, ca_key, dns_names, ip_addresses, days, _utc(now)
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(files.key, private_key_pem(key), PRIVATE_MODE, force)
    _write(files.cert, certificate_pem(cert), PUBLIC_MODE, force)
    return files


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
                hint="pass --force (force=True) to replace it; anything that trusts or "
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


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ConfigError("'now' must be a timezone-aware datetime")
    return now.astimezone(dt.UTC)


# ------------------------------------------------------------------ file reading


def load_ca(
    ca_dir: Path | str,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load ``ca.pem`` and ``ca.key`` from ``ca_dir`` and check they belong together.

    Raises
    ------
    ConfigError
        If a file is missing or unreadable, the certificate is not a CA, the key is
        not an EC key, or the key does not match the certificate.
    """
    folder = Path(ca_dir)
    cert_path, key_path = folder / CA_CERT_NAME, folder / CA_KEY_NAME
    for path in (cert_path, key_path):
        if not path.is_file():
            raise ConfigError(
                f"{path} not found",
                hint=f"pass the folder given to `wardround certs init --out`, or "
                f"create a CA with: wardround certs init --out {folder}",
            )
    cert = load_certificate(cert_path, "the CA certificate")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{key_path} is not an unencrypted PEM private key",
            hint=f"expected the ca.key written by: wardround certs init --out {folder}",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is not an EC private key")
    if not describe(cert, cert_path).is_ca:
        raise ConfigError(f"{cert_path} is not a CA certificate")
    if key.public_key() != cert.public_key():
        raise ConfigError(
            f"{key_path} does not belong to {cert_path}",
            hint="both files must come from the same `wardround certs init`",
        )
    return cert, key


def load_certificate(
    path: Path | str, what: str = "a PEM certificate"
) -> x509.Certificate:
    """Load the first certificate of a PEM file.

    Raises
    ------
    ConfigError
        If the file is missing or holds no PEM certificate (``what`` says what it was
        expected to be).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; expected {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; expected {what}") from None
    if b"PRIVATE KEY-----" in data or data.startswith(b"ssh-"):
        raise ConfigError(
            f"{path} is a key, not a certificate; expected {what}",
            hint="certificates are the .pem files (ca.pem, coordinator.pem)",
        )
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(
            f"{path} is not a PEM certificate; expected {what}",
            hint="a PEM certificate starts with -----BEGIN CERTIFICATE-----",
        ) from None


def describe_certificate(
    path: Path | str, now: dt.datetime | None = None
) -> CertificateInfo:
    """Describe the certificate in ``path``; ``days_left`` counts from ``now`` (UTC).

    Raises
    ------
    ConfigError
        If ``path`` holds no PEM certificate.
    """
    path = Path(path)
    return describe(load_certificate(path), path, _utc(now))


def verify_issued_by(cert_path: Path | str, ca_path: Path | str) -> bool:
    """Whether the CA certificate in ``ca_path`` signed the certificate in ``cert_path``.

    Checks the issuer name and the signature (ECDSA for wardround's CAs) with the
    CA's public key; validity dates and extensions are not checked.

    Raises
    ------
    ConfigError
        If either file holds no PEM certificate.
    """
    cert = load_certificate(cert_path)
    ca_cert = load_certificate(ca_path, "a CA certificate")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        # ValueError: issuer name differs; TypeError: unsupported key type.
        return False
    return True


def public_key_fingerprint(pub_path: Path | str) -> str:
    """SHA-256 (hex) of the key blob in an OpenSSH public key file.

    Raises
    ------
    ConfigError
        If the file is missing or is not an OpenSSH public key.
    """
    path = Path(pub_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; expected an OpenSSH public key") from None
    try:
        serialization.load_ssh_public_key(data)
        # Field 2 of "<type> <base64 blob> [comment]" is the key blob OpenSSH hashes.
        blob = base64.b64decode(data.split()[1], validate=True)
    except (ValueError, IndexError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{path} is not an OpenSSH public key",
            hint="expected a .pub file written by: wardround keys site NAME --out DIR",
        ) from None
    return hashlib.sha256(blob).hexdigest()
