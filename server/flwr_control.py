"""The coordinator's admin commands talk to the SuperLink through Flower's own CLI.

``flwr`` reaches the SuperLink's Control API over TLS, with the federation's CA, as
the connection ``wardround`` in a private ``FLWR_HOME`` inside the coordinator's
state folder. Every call asks for ``--format json`` and turns a failure into a
:class:`FederationError` that says what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import tomli_w

from ..common.errors import FederationError
from ..ops.env import apply_machine_hygiene
from ..ops.processes import flower_binary
from .coordinator_config import FEDERATION_NAME, CoordinatorConfig


def write_connection(config: CoordinatorConfig) -> Path:
    """Write the ``wardround`` SuperLink connection into the private FLWR_HOME."""
    home = config.flwr_home
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / "config.toml"
    document = {
        "superlink": {
            "default": FEDERATION_NAME,
            FEDERATION_NAME: {
                "address": config.admin_address,
                "root-certificates": str(config.ca_path),
            },
        }
    }
    path.write_text(tomli_w.dumps(document))
    return path


def flwr_env(config: CoordinatorConfig) -> dict[str, str]:
    """The environment of a ``flwr`` call: machine hygiene and the private FLWR_HOME."""
    saved = dict(os.environ)
    try:
        os.environ["FLWR_HOME"] = str(config.flwr_home)
        apply_machine_hygiene(config.state_path)
        return dict(os.environ)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def flwr_json(
    config: CoordinatorConfig, *args: str, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Run ``flwr ARGS... wardround --format json``; return its JSON or raise."""
    write_connection(config)
    command = [flower_binary("flwr"), *args, FEDERATION_NAME, "--format", "json"]
    try:
        done = subprocess.run(  # noqa: S603 - arguments built here, no shell
            command,
            env=flwr_env(config),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FederationError(
            f"`flwr {args[0]}` did not answer within {timeout_s:.0f} s",
            hint=f"Is the coordinator running and reachable at {config.admin_address}?",
        ) from None
    payload = _last_json(done.stdout)
    if payload is None or not payload.get("success", False):
        detail = (payload or {}).get("error-message") or done.stderr.strip()[-500:]
        raise FederationError(
            f"`flwr {' '.join(args[:2])}` failed: {_plain(detail)}",
            hint=_hint_for(detail, config),
        )
    return payload


def _last_json(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _plain(detail: str) -> str:
    return " ".join(line.strip() for line in str(detail).splitlines() if line.strip())


def _hint_for(detail: str, config: CoordinatorConfig) -> str:
    text = str(detail)
    if "Connection refused" in text or "connect" in text.lower():
        return (
            f"Start the coordinator first (`wardround coordinator start --config ...`); "
            f"the admin commands reach it at {config.admin_address}."
        )
    if "CERTIFICATE" in text:
        return (
            "The coordinator's certificate does not match [tls] ca-certificate, or does "
            "not name coordinator.admin-address."
        )
    return "See the coordinator's log in its state folder (superlink.log)."
