"""Every file under a site's DICOM folders, once each, and how the index names it.

``site check``, training and ``site deid`` all list files through
:func:`walk_entries`, so they see the same files: folder links are followed, each
folder is listed once (a link to a parent folder ends nothing), a broken link is a
file that fails rather than one left out, and folders the account may not list
are named. A path that is not UTF-8 (old Samba or ISO-8859 shares) is kept in the
index's UTF-8 ``path`` column as a ``file://`` URI of its bytes.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

_ESCAPED = "file://"  # an index path that is not UTF-8, as a URI of its bytes


def stored_path(path: str) -> str:
    """``path`` as the index's ``path`` column holds it (Arrow strings are UTF-8).

    A name that is not UTF-8 (Python holds its bytes as surrogates) becomes a
    ``file://`` URI of its bytes; every other path is kept as it is.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return _ESCAPED + urllib.parse.quote(os.fsencode(path))
    return path


def file_path(stored: str) -> Path:
    """The path that opens the file an index row names (see :func:`stored_path`).

    Index paths are absolute, so only an escaped one starts with ``file://``.
    """
    if stored.startswith(_ESCAPED):
        raw = urllib.parse.unquote_to_bytes(stored.removeprefix(_ESCAPED))
        return Path(os.fsdecode(raw))
    return Path(stored)


def walk_files(root: Path, *, unlisted: list[str] | None = None) -> Iterator[Path]:
    """Yield every file under ``root`` once, as reached from ``root``.

    Folder links are followed and each folder is listed once, so a link to a
    parent folder ends nothing and repeats nothing; a folder reached both ways is
    listed under its own path, not the link's. A broken link is yielded too: it
    is a file that fails, not one left out. Folders the account may not list are
    appended to ``unlisted`` (their real paths).
    """
    unlisted = [] if unlisted is None else unlisted
    for reached, _, _ in walk_entries([Path(root)], skip=None, unlisted=unlisted):
        yield Path(reached)


def walk_entries(
    roots: list[Path], *, skip: Path | None, unlisted: list[str]
) -> Iterator[tuple[str, str, os.stat_result | None]]:
    """Yield (path as reached, real path, stat) of every file, once each.

    The stat is None for a broken link. Folders are known by (device, inode), so
    each is listed once however many links lead to it; folders reached through a
    link are listed after all others. Folders the account may not list are
    appended to ``unlisted``, so that the report names them instead of leaving
    their files out unseen.
    """
    listed: set[tuple[int, int]] = set()
    if skip is not None and skip.is_dir():
        listed.add(_folder_key(os.stat(skip)))
    files: set[str] = set()
    folders = [os.fspath(root) for root in reversed(roots)]
    linked: list[str] = []
    while folders or linked:
        here = folders.pop() if folders else linked.pop(0)
        try:
            key = _folder_key(os.stat(here))
        except OSError:
            continue
        if key in listed:
            continue
        listed.add(key)
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except PermissionError:
            unlisted.append(os.path.realpath(here))
            continue
        except OSError:
            continue
        subdirs: list[str] = []
        for entry in entries:
            kind = _kind(entry)
            if kind == "folder":
                (linked if entry.is_symlink() else subdirs).append(entry.path)
                continue
            try:
                if kind == "file":
                    real, stat = os.path.realpath(entry.path), entry.stat()
                elif kind == "broken link":  # named where it is, not by its target
                    real = os.path.join(os.path.realpath(here), entry.name)
                    stat = None
                else:
                    continue  # a pipe, socket or device: not a file to read
            except OSError:
                continue
            if real not in files:
                files.add(real)
                yield entry.path, real, stat
        folders.extend(reversed(subdirs))


def _folder_key(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _kind(entry: os.DirEntry) -> str | None:
    """What the entry is: a "folder", a "file", a "broken link", or None (other)."""
    try:
        if entry.is_dir():
            return "folder"
        if entry.is_file():
            return "file"
    except OSError:  # a loop of links (a missing target is just False)
        pass
    try:
        gone = entry.is_symlink() and not os.path.exists(entry.path)
    except OSError:
        return None
    return "broken link" if gone else None
