"""A coordinator.toml in a test folder, and file modes: shared by the deploy tests."""

from __future__ import annotations

import stat
from pathlib import Path

from wardround.server.coordinator_config import CoordinatorConfig

TLS_TABLE = """
[tls]
ca-certificate = "tls/ca.pem"
certificate = "tls/coordinator.pem"
private-key = "tls/coordinator.key"
"""


def coordinator_config(folder: Path, extra: str = "") -> CoordinatorConfig:
    """A parsed coordinator.toml written into ``folder`` (state in ``state/``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "coordinator.toml"
    path.write_text(f'[coordinator]\nstate-dir = "state"\n{extra}\n{TLS_TABLE}')
    return CoordinatorConfig.from_toml(path)


def file_mode(path: Path) -> int:
    """A file's permission bits."""
    return stat.S_IMODE(path.stat().st_mode)
