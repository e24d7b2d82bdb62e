"""Small secret files (a key, a shared secret): created once, mode 0600, never logged.

The site's SuperExec secret and every audit log's key are such files. A secret is
64 hex digits (256 random bits from :mod:`secrets`). It is created atomically (a
full temporary file hard-linked into place), so two processes starting at once agree
on one secret and neither reads a half-written file. A secret file that other users
may read is refused: anyone who reads it can act as its owner.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..common.errors import ConfigError

SECRET_BYTES = 32
_PRIVATE = 0o600


def read_secret(path: Path, what: str) -> bytes:
    """The secret in ``path``; ConfigError if it is missing, empty or not private.

    ``what`` names the secret in errors (e.g. "the audit key"); the secret itself is
    never part of an error.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {path} does not exist",
            hint="Give the file it was created in.",
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} is readable or writable by other users",
            hint=f"Run `chmod 600 {path}`.",
        )
    secret = b"".join(chunks).strip()
    if not secret:
        raise ConfigError(
            f"{what} {path} is empty",
            hint="Restore it from a backup; a new one cannot verify what the old "
            "one signed.",
        )
    return secret


def load_or_create_secret(path: Path, what: str) -> bytes:
    """The secret in ``path``, created there (0600) on first use."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _PRIVATE)
        try:
            os.fchmod(fd, _PRIVATE)  # whatever the umask
            os.write(fd, secrets.token_hex(SECRET_BYTES).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return read_secret(path, what)
