"""Credentials for the hospital's database and PACS: from a 0600 file or the environment.

``site.toml`` names where a password is (``password-file`` or ``password-env``),
never the password itself. A file readable by group or others is refused: the
password would be as exposed as the data it guards. The value is returned to the
caller only; it is never logged, put in an error message or written to the audit.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, model_validator

from ..common.config import _Section
from ..common.errors import ConfigError


class SecretSource(_Section):
    """Where a password is: a file (mode 0600) or an environment variable."""

    password_file: str | None = Field(
        None,
        description="file holding the password (mode 0600: readable by its owner only)",
    )
    password_env: str | None = Field(
        None, description="environment variable holding the password"
    )

    @model_validator(mode="after")
    def _one_place(self) -> SecretSource:
        if self.password_file and self.password_env:
            raise ValueError("set password-file or password-env, not both")
        return self


def read_secret(source: SecretSource, base_dir: Path, what: str) -> str | None:
    """The password ``source`` names (None when it names none).

    ``what`` names the setting in messages (e.g. ``[data.ehr-database]``).
    Raises :class:`ConfigError` saying what to fix; the message never holds
    the value.
    """
    if source.password_env:
        value = os.environ.get(source.password_env)
        if value is None:
            raise ConfigError(
                f"{what} password-env names {source.password_env!r}, which is not set",
                hint=f"Export {source.password_env} in the site daemon's environment "
                "(e.g. its service unit), or use password-file.",
            )
        _printable(value, what, f"password-env {source.password_env}")
        return value
    if not source.password_file:
        return None
    path = Path(source.password_file).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(
            f"{what} password-file {path} cannot be read ({exc.strerror})",
            hint="Write the password into that file, then `chmod 600` it.",
        ) from None
    if mode & 0o077:
        raise ConfigError(
            f"{what} password-file {path} is readable by others "
            f"(mode {mode & 0o777:03o})",
            hint=f"`chmod 600 {path}`: only the site's own account may read it.",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{what} password-file {path} cannot be read ({type(exc).__name__})",
            hint="The file must hold the password as UTF-8 text.",
        ) from None
    # One trailing newline is what `echo secret > file` leaves; it is not part of it.
    value = text[:-1] if text.endswith("\n") else text
    _printable(value, what, f"password-file {path}")
    return value


def _printable(value: str, what: str, where: str) -> None:
    # A control character would be percent-encoded into a URL a server may echo.
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(
            f"{what} {where} holds a control character",
            hint="Write the password alone, on one line, without NUL or tabs.",
        )


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""Hosts where a password never crosses a network."""


def url_with_password(url: str, password: str | None) -> str:
    """``url`` with ``password`` put after its user (for a driver only; never shown)."""
    if password is None:
        return url
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
