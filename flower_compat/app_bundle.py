"""A run as a Flower App Bundle (FAB): its one file, and the hash sites approve.

The FAB is built from the run config alone: a ``pyproject.toml`` that names
wardround's ServerApp and ClientApp and carries every run setting, so the same
run.toml always gives the same hash. ``wardround launch`` submits it and
``wardround site approve --run-config`` recomputes its hash: both build it here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from ..common.config import RunConfig
from ..common.errors import ConfigError

APP_NAME = "wardround-run"


@dataclass(frozen=True)
class AppBundle:
    """The folder ``flwr run`` bundles, and the FAB hash sites approve."""

    folder: Path
    fab_hash: str


def app_pyproject(config: RunConfig) -> str:
    """The FAB's only file: wardround's components and the whole run config."""
    from wardround import __version__

    document = {
        "build-system": {
            "requires": ["setuptools>=69"],
            "build-backend": "setuptools.build_meta",
        },
        "project": {
            "name": APP_NAME,
            "version": _plain_version(__version__),
            "description": "A wardround run: settings only; sites run their installed wardround.",
            "dependencies": [f"wardround=={__version__}"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "wardround",
                    "components": {
                        "serverapp": "wardround.server.app:app",
                        "clientapp": "wardround.client.app:app",
                    },
                    "config": config.to_flower(),
                }
            }
        },
    }
    return tomli_w.dumps(document)


def _plain_version(version: str) -> str:
    # Flower wants MAJOR.MINOR.PATCH in [project].version
    parts = [p for p in version.split("+")[0].split(".")[:3] if p.isdigit()]
    return ".".join((parts + ["0", "0", "0"])[:3])


def build_app(config: RunConfig, apps_dir: Path) -> AppBundle:
    """Write the app folder (keyed by its content) and compute the FAB's sha256."""
    from .tools import build_fab_from_disk

    check_deployable(config)
    text = app_pyproject(config)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(apps_dir) / key / APP_NAME
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(text)
    fab = build_fab_from_disk(folder)
    return AppBundle(folder=folder, fab_hash=hashlib.sha256(fab).hexdigest())


def check_deployable(config: RunConfig) -> None:
    """Refuse simulation-only settings in a deployed run."""
    if config.data.synthesize_sites or config.data.sites_dir:
        raise ConfigError(
            "data.sites-dir / data.synthesize-sites are simulation settings; on the "
            "deployed federation every site reads its own site.toml",
            hint="Remove the [data] section from the run config.",
        )
