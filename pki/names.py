"""Validated inputs of the PKI: names, host names, IP addresses, validity."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re

from wardround.common.errors import ConfigError

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


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


def validate_days(days: int) -> int:
    """A certificate validity in days: at least one, ending by the year 9999."""
    if days < 1:
        raise ConfigError(f"invalid validity of {days} days: use 1 or more")
    latest = (dt.datetime(9999, 12, 31, tzinfo=dt.UTC) - dt.datetime.now(dt.UTC)).days
    if days > latest:
        raise ConfigError(
            f"a validity of {days} days ends after the year 9999, the last an X.509 "
            f"date can name: use at most {latest}"
        )
    return days


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
