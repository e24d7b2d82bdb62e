"""Sites without imaging: which runs they take part in, and how they read the task.

A site whose ``site.toml`` names no DICOM folder (``data.dicom-dirs`` absent or
empty) has EHR rows and notes only. Its studies train through the missing-modality
path that studies without image already take at imaged sites: ``present`` marks
the image absent and the fusion layer masks it. So it can join any run that does
not require an image per study (:attr:`RunConfig.requires_images
<wardround.common.config.RunConfig.requires_images>`), beside sites with imaging.
"""

from __future__ import annotations

from ..common.config import TaskConfig
from ..common.errors import DataError
from .site_config import SiteConfig

NO_IMAGING_HINT = (
    "Run it with task.require-image = false (studies without image then train on "
    "their EHR and note) or with model.modalities without image; or, if the site has "
    "images, name its DICOM folders in data.dicom-dirs of site.toml."
)


def no_imaging_error(site: SiteConfig) -> DataError:
    """The refusal of a run that needs images, at a site that has none."""
    return DataError(
        f"site {site.site.name!r} has no imaging (its site.toml names no "
        "data.dicom-dirs) and this run requires an image for every study",
        hint=NO_IMAGING_HINT,
    )


def task_for_site(
    site: SiteConfig, task: TaskConfig, images_required: bool | None
) -> TaskConfig:
    """The run's task as this site applies it.

    A site with imaging applies ``task`` as it is. A site without imaging keeps
    every EHR row, without image (``require_image`` false), when the run does not
    require images (``images_required`` false) or is not known yet (None: the site
    daemon before any run, `site check` without ``--run-config``); a run that
    requires images raises :class:`DataError` saying what to change.
    """
    if site.has_imaging:
        return task
    if images_required:
        raise no_imaging_error(site)
    if task.require_image:
        return task.model_copy(update={"require_image": False})
    return task
