"""Enrolled sites: ``wardround sites add|list|revoke``.

The SuperLink authenticates SuperNodes by public key (Flower's
``flwr supernode register``). wardround keeps, next to it, who each key belongs to
in ``<state>/sites.json``: the site's name, its Flower node id, the key's sha256 and
when it was enrolled or revoked. The ServerApp names sites from this file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, DataError
from ..ops.audit import AuditLog
from .coordinator_config import CoordinatorConfig
from .flwr_control import flwr_json


@dataclass(frozen=True)
class EnrolledSite:
    """One row of ``sites.json``."""

    name: str
    node_id: int
    public_key_sha256: str
    enrolled_at: str
    revoked_at: str | None = None
    public_key: str = ""
    """The OpenSSH public key (not secret): re-enrolled when the coordinator restarts."""

    @property
    def active(self) -> bool:
        """Enrolled and not revoked."""
        return self.revoked_at is None


def load_sites(path: Path) -> dict[str, EnrolledSite]:
    """The enrolled sites by name ({} before the first enrolment)."""
    if not Path(path).exists():
        return {}
    try:
        raw = json.loads(Path(path).read_text())["sites"]
        return {name: EnrolledSite(name=name, **row) for name, row in raw.items()}
    except (
        json.JSONDecodeError,
        KeyError,
        TypeError,
        AttributeError,
        UnicodeDecodeError,
    ) as exc:
        backup = backup_path(path)
        hint = (
            f"Restore the copy of its last good version: `cp {backup} {path}` (the "
            "next coordinator start registers the restored keys again)."
            if backup.is_file()
            else f"Move {path} aside and enrol each site again with `wardround sites "
            "add NAME --key NAME.pub`."
        )
        raise DataError(
            f"{path} is damaged ({type(exc).__name__})", hint=hint
        ) from None


def backup_path(path: Path) -> Path:
    """Where ``save_sites`` keeps a second copy of what it wrote."""
    path = Path(path)
    return path.with_name(path.name + ".bak")


def save_sites(path: Path, sites: dict[str, EnrolledSite]) -> None:
    """Write ``sites.json`` atomically, mode 0600, and then the same to its copy.

    The copy (``sites.json.bak``) is what a damaged file is restored from. It is the
    latest version, never an older one: an older one could still hold a key that
    has since been revoked.
    """
    path = Path(path)
    rows = {
        name: {k: v for k, v in site.__dict__.items() if k != "name"}
        for name, site in sorted(sites.items())
    }
    data = (json.dumps({"sites": rows}, indent=2) + "\n").encode()
    _write_private(path, data)
    _write_private(backup_path(path), data)


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably, mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # a leftover .tmp keeps its old mode
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _audit(config: CoordinatorConfig) -> AuditLog:
    return AuditLog(config.audit_path, actor="coordinator")


def add_site(config: CoordinatorConfig, name: str, public_key: Path) -> EnrolledSite:
    """Register the site's key at the SuperLink and record who it belongs to."""
    from ..pki import public_key_fingerprint, validate_name

    validate_name(name, "site name")
    public_key = Path(public_key)
    if not public_key.is_file():
        raise ConfigError(f"public key {public_key} does not exist")
    try:
        fingerprint = public_key_fingerprint(public_key)
    except (ValueError, ConfigError):
        raise ConfigError(
            f"{public_key} is not an OpenSSH public key",
            hint="Use the .pub file that `wardround keys site NAME` wrote at the site.",
        ) from None
    sites = load_sites(config.sites_path)
    if name in sites and sites[name].active:
        raise ConfigError(
            f"site {name!r} is already enrolled (node {sites[name].node_id})",
            hint=f"Revoke it first (`wardround sites revoke {name}`) to enrol a new key.",
        )
    for other in sites.values():
        if other.public_key_sha256 == fingerprint and other.active:
            raise ConfigError(
                f"this key is already enrolled as site {other.name!r}",
                hint="Every site needs its own key pair (`wardround keys site NAME`).",
            )
        if other.public_key_sha256 == fingerprint:
            # A revoked key may be in the wrong hands; it never comes back.
            raise ConfigError(
                f"this key was revoked (site {other.name!r}, {other.revoked_at}) and "
                "cannot be enrolled again",
                hint=f"The site makes a new key pair (`wardround keys site {name}`) "
                "and sends its .pub.",
            )
    reply = flwr_json(config, "supernode", "register", str(public_key))
    site = EnrolledSite(
        name=name,
        node_id=int(reply["node-id"]),
        public_key_sha256=fingerprint,
        enrolled_at=_now(),
        public_key=public_key.read_text().strip(),
    )
    sites[name] = site
    config.state_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    save_sites(config.sites_path, sites)
    _audit(config).record(
        "site_enrolled", site=name, node_id=str(site.node_id), key_sha256=fingerprint
    )
    return site


def reenrol_sites(config: CoordinatorConfig) -> list[str]:
    """Register every active site's key with a freshly started SuperLink.

    The SuperLink keeps its state in memory (its SQL state costs more CPU per array
    transfer than the round itself); ``sites.json`` is the record of who is enrolled,
    and a restart registers those keys again. Revoked sites stay out.
    """
    import tempfile

    sites = load_sites(config.sites_path)
    done = []
    for name, site in sorted(sites.items()):
        if not site.active or not site.public_key:
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".pub", delete=False) as handle:
            handle.write(site.public_key + "\n")
            key_file = Path(handle.name)
        try:
            reply = flwr_json(config, "supernode", "register", str(key_file))
        finally:
            key_file.unlink(missing_ok=True)
        sites[name] = EnrolledSite(
            **{**site.__dict__, "node_id": int(reply["node-id"])}
        )
        done.append(name)
    if done:
        save_sites(config.sites_path, sites)
    return done


def revoke_site(config: CoordinatorConfig, name: str) -> EnrolledSite:
    """Unregister the site's key at the SuperLink: it is refused from now on."""
    sites = load_sites(config.sites_path)
    if name not in sites:
        known = ", ".join(sorted(sites)) or "none"
        raise ConfigError(f"no enrolled site {name!r} (enrolled: {known})")
    site = sites[name]
    if not site.active:
        raise ConfigError(f"site {name!r} was already revoked at {site.revoked_at}")
    flwr_json(config, "supernode", "unregister", str(site.node_id))
    revoked = EnrolledSite(**{**site.__dict__, "revoked_at": _now()})
    sites[name] = revoked
    save_sites(config.sites_path, sites)
    _audit(config).record("site_revoked", site=name, node_id=str(site.node_id))
    return revoked


def list_sites(config: CoordinatorConfig) -> list[dict[str, Any]]:
    """Enrolled sites with the SuperLink's view of each (online, offline ...)."""
    sites = load_sites(config.sites_path)
    status: dict[int, dict[str, Any]] = {}
    reachable = True
    try:
        for node in flwr_json(config, "supernode", "list").get("nodes", []):
            status[int(node["node-id"])] = node
    except Exception:  # noqa: BLE001 - listing still works from sites.json alone
        reachable = False
    rows = []
    for site in sorted(sites.values(), key=lambda s: s.name):
        node = status.get(site.node_id, {})
        rows.append(
            {
                "site": site.name,
                "node_id": str(site.node_id),
                "state": "revoked"
                if not site.active
                else (
                    node.get("status", "unknown") if reachable else "coordinator down"
                ),
                "online_at": node.get("online-at", "N/A"),
                "offline_at": node.get("offline-at", "N/A"),
                "enrolled_at": site.enrolled_at,
                "revoked_at": site.revoked_at,
                "key_sha256": site.public_key_sha256,
            }
        )
    return rows
