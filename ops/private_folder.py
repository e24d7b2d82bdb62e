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


def private_folder(path: Path, what: str, *, holds: Path | None = None) -> Path:
    """``path``, created 0700 if missing, tightened to 0700 if it is ours and looser.

    Refused: a folder another account owns (it could read or swap what is written
    there, whatever its mode), and a loose one that is not the cache's alone: one
    anyone may write to (``/tmp``), or ``holds`` (the site's folder) or a folder
    above it, whose mode other people's access may rest on. ``what`` names it in
    messages. A file system that ignores ``chmod`` is refused too.
    """
    path = Path(path)
    if path.is_symlink() and path.lstat().st_uid != os.geteuid():
        # planted where the cache was to be (a shared folder): it could point at
        # any folder of the site's account, which would then be tightened
        raise _refused(path, what, "it is a link another account made")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.geteuid():
        raise _refused(path, what, f"it belongs to another account (uid {info.st_uid})")
    if not mode & 0o077:
        return path
    shared = holds is not None and (
        path.resolve() == Path(holds).resolve()
        or path.resolve() in Path(holds).resolve().parents
    )
    if mode & 0o002 or shared:
        raise _refused(
            path,
            what,
            f"other accounts may read it (mode {mode:04o}) and it is not the cache's "
            "alone",
        )
    os.chmod(path, 0o700)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise _refused(
            path, what, f"its file system keeps mode {mode:04o} whatever chmod says"
        )
    log.warning(
        "%s %s could be read by other accounts (mode %04o): now 0700", what, path, mode
    )
    return path


def _refused(path: Path, what: str, why: str) -> ConfigError:
    return ConfigError(
        f"{what} {path} cannot be kept from other accounts of this host: {why}; it "
        "holds data derived from patients",
        hint="Run wardround as the site's account (e.g. `sudo -u wardround ...`), "
        "and give the cache a folder of its own that this account owns (the "
        'default ".wardround-cache" next to site.toml is made 0700), on a file '
        "system that keeps Unix modes.",
    )
