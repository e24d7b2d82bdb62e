"""Network addresses as the config files give them (no scheme, no path)."""

from __future__ import annotations

import ipaddress
import re

HOST_PORT = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
    r":(?:6553[0-5]|655[0-2]\d|65[0-4]\d{2}|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})"
)
"""HOST:PORT, where HOST is a name, an IPv4 address or a bracketed IPv6 address."""

_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def is_host(host: str) -> bool:
    """A host name or an IP address, without a port (IPv6 with or without brackets)."""
    if _HOST_NAME.fullmatch(host):
        return True
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return False
    return ":" in bare or bare == host  # brackets only around IPv6
