"""Pure x509 building and reading: keys and names in, certificates out.

No file is read or written here; :mod:`wardround.pki.files` does that.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wardround.common.errors import ConfigError

EXPIRY_WARNING_DAYS = 30


# P-384 for every key: Flower accepts NIST curves for SuperNode keys, and gRPC
# (BoringSSL) and OpenSSL both serve ECDSA P-384 certificates.
_CURVE = ec.SECP384R1
_SIGNATURE_HASH = hashes.SHA384


# Certificates start a few minutes in the past so a peer whose clock runs slightly
# behind does not reject a certificate issued a moment ago.
_CLOCK_SKEW = dt.timedelta(minutes=5)


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


def utc_now(now: dt.datetime | None) -> dt.datetime:
    """``now`` in UTC (the current time when None); a naive datetime is refused."""
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ConfigError("'now' must be a timezone-aware datetime")
    return now.astimezone(dt.UTC)
