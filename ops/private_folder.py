"""Folders only their owner may enter: where a site keeps what derives from patients.

The site's cache holds decoded images, the DICOM index (paths and UIDs) and the
studies fetched from the PACS. Its files are written with the process's umask (a
shell's 022 makes them world-readable), so the folder itself is what keeps other
accounts of the host out: 0700, whatever the umask.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from ..common.errors import ConfigError

log = logging.getLogger(__name__)


def private_folder(path: Path, what: str) -> Path:
    """``path``, created 0700 if missing, tightened to 0700 if it is ours and looser.

    A folder of another owner, or one that anyone may write to (``/tmp``), is
    refused: it is not the site's to tighten. ``what`` names it in messages.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return path
    if mode & 0o002 or info.st_uid != os.geteuid():
        raise ConfigError(
            f"{what} {path} may be read by other accounts of this host (mode "
            f"{mode:04o}, owner uid {info.st_uid}), and it holds data derived from "
            "patients",
            hint="Give it a folder of the site's own (e.g. the default "
            '".wardround-cache" next to site.toml), or make this one the site '
            f"account's with mode 0700 (`chmod 700 {path}`).",
        )
    os.chmod(path, 0o700)
    log.warning(
        "%s %s could be read by other accounts (mode %04o): now 0700", what, path, mode
    )
    return path
