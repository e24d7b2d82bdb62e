"""Reading the PKI's files back: the CA, certificates and site public keys."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from wardround.common.errors import ConfigError

from .certificates import CertificateInfo, describe, utc_now
from .names import CA_CERT_NAME, CA_KEY_NAME


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
    return describe(load_certificate(path), path, utc_now(now))


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


def check_site_private_key(path: Path | str) -> None:
    """Refuse a file Flower's SuperNode cannot authenticate with, saying what it is.

    The SuperNode wants the OpenSSH elliptic-curve key `wardround keys site` writes;
    given anything else it exits and is restarted without end.

    Raises
    ------
    ConfigError
        The file is not an OpenSSH EC private key.
    """
    path = Path(path)
    data = path.read_bytes()
    expected = "the OpenSSH private key `wardround keys site NAME` writes (NAME.key)"
    if data.startswith(b"ecdsa-sha2-") or data.startswith(b"ssh-"):
        raise ConfigError(
            f"{path} is a public key; expected {expected}",
            hint="Name the .key file beside it, not the .pub.",
        )
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        what = (
            "a PEM private key, not an OpenSSH one"
            if b"-----BEGIN" in data and b"PRIVATE KEY-----" in data
            else "not an OpenSSH private key"
        )
        raise ConfigError(
            f"{path} is {what}; expected {expected}",
            hint="Make the site's key pair with `wardround keys site NAME` and "
            "enrol its .pub at the coordinator.",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"{path} is not an elliptic-curve key; expected {expected}",
            hint="Make the site's key pair with `wardround keys site NAME`.",
        )


def check_key_matches_certificate(key_path: Path | str, cert_path: Path | str) -> None:
    """Refuse a TLS private key that is not PEM or not the certificate's key.

    Raises
    ------
    ConfigError
        Saying which, before a TLS server fails on it with an SSL error in its log.
    """
    key_path = Path(key_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{key_path} is not an unencrypted PEM private key",
            hint="Use the .key file `wardround certs server` wrote beside the "
            "certificate.",
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    cert_key = load_certificate(cert_path).public_key().public_bytes(der, spki)
    if key.public_key().public_bytes(der, spki) != cert_key:
        raise ConfigError(
            f"{key_path} is not the private key of {cert_path}",
            hint="Name the key `wardround certs server` wrote with that certificate.",
        )
