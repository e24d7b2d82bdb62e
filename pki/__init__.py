"""A small PKI for a federation: CA, coordinator TLS certificate, site keys.

Flower's SuperLink serves TLS with ``--ssl-ca-certfile ca.pem --ssl-certfile
coordinator.pem --ssl-keyfile coordinator.key``; SuperNodes check it with
``--root-certificates ca.pem`` and authenticate with an EC key pair in OpenSSH format
(``--auth-supernode-private-key site.key``; the ``.pub`` is registered at the
SuperLink).

A library both daemons and the ``wardround certs``/``keys`` commands import:
:mod:`.certificates` is pure (keys and names in, x509 objects out), :mod:`.files`
writes the files and :mod:`.loading` reads them back.
"""

from .certificates import (
    EXPIRY_WARNING_DAYS,
    CertificateInfo,
    build_ca_certificate,
    build_server_certificate,
    certificate_pem,
    describe,
    expiry_warning,
    new_private_key,
    private_key_pem,
    site_key_openssh,
)
from .files import (
    CaFiles,
    ServerFiles,
    SiteKeyFiles,
    generate_site_keypair,
    init_ca,
    issue_server_certificate,
)
from .loading import (
    describe_certificate,
    load_ca,
    load_certificate,
    public_key_fingerprint,
    verify_issued_by,
)
from .names import (
    CA_CERT_NAME,
    CA_KEY_NAME,
    PRIVATE_MODE,
    PUBLIC_MODE,
    validate_hosts,
    validate_ips,
    validate_name,
)

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "EXPIRY_WARNING_DAYS",
    "PRIVATE_MODE",
    "PUBLIC_MODE",
    "CaFiles",
    "CertificateInfo",
    "ServerFiles",
    "SiteKeyFiles",
    "build_ca_certificate",
    "build_server_certificate",
    "certificate_pem",
    "describe",
    "describe_certificate",
    "expiry_warning",
    "generate_site_keypair",
    "init_ca",
    "issue_server_certificate",
    "load_ca",
    "load_certificate",
    "new_private_key",
    "private_key_pem",
    "public_key_fingerprint",
    "site_key_openssh",
    "validate_hosts",
    "validate_ips",
    "validate_name",
    "verify_issued_by",
]
