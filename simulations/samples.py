"""Bring the sites' generated texts into a simulation's run directory.

A site keeps what its model generated (``<cache-dir>/generations/<run id>/
round-NNN.jsonl``, see ``client/app.py``): the texts derive from patient data and
never cross the wire. In a simulation every site is on this machine, so the
runner copies them to ``<run dir>/samples/<site>/round-NNN.jsonl``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..client.runtime import samples_folder
from ..sitedata.site_config import SiteConfig


def gather_samples(sites_dir: Path, run_id: str, run_dir: Path) -> list[Path]:
    """Copy every site's sample files of ``run_id``; return the copies, sorted."""
    copied = []
    for site_toml in sorted(Path(sites_dir).glob("*/site.toml")):
        site = SiteConfig.from_toml(site_toml)
        source = samples_folder(site.cache_path, run_id)
        if not source.is_dir():
            continue
        target = Path(run_dir) / "samples" / site_toml.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.glob("round-*.jsonl")):
            copied.append(Path(shutil.copy2(path, target / path.name)))
    return sorted(copied)
