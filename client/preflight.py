"""Fast checks of a site before a run starts: settings, folders, EHR schema.

Reads no image and no EHR row, so a simulation (or a site daemon) can refuse a
broken site in well under a second, with every problem named.
"""

from __future__ import annotations

from pathlib import Path

from ..common.config import TaskConfig
from ..common.errors import DataError
from ..sitedata.dicom_index import not_folders
from ..sitedata.ehr import open_ehr
from ..sitedata.ehr_source import ehr_source
from ..sitedata.imaging import task_for_site
from ..sitedata.site_config import SiteConfig


def preflight_site(
    site_toml: Path, task: TaskConfig, *, images_required: bool | None = None
) -> SiteConfig:
    """Parse ``site.toml``; check its folders, EHR columns and that its servers answer.

    ``images_required`` (:attr:`RunConfig.requires_images`): a site without
    imaging is refused when the run requires images (None: not known here).
    """
    site = SiteConfig.from_toml(site_toml)
    task_for_site(site, task, images_required)
    missing = not_folders(site.dicom_paths)
    if missing:
        raise DataError(
            f"{site_toml}: DICOM folder(s) not usable: {', '.join(missing)}",
            hint="Fix `data.dicom-dirs` in site.toml (paths are relative to site.toml); "
            "a site without imaging names none.",
        )
    open_ehr(ehr_source(site), task, site.ehr)
    if site.data.pacs is not None:
        from ..sitedata.pacs import check_pacs_reachable

        check_pacs_reachable(site.data.pacs, site.base_dir)
    return site
