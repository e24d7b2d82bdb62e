"""Configs read from one TOML file: ``site.toml`` and ``coordinator.toml``.

Both are parsed once, at the edge, the same way: the file is read, its folder
becomes ``base_dir`` (relative paths in the file resolve against it), and every
problem is reported at once as one ConfigError with the class's hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import Field, ValidationError

from ..common.config import _describe, _Section, read_toml
from ..common.errors import ConfigError


class TomlFileConfig(_Section):
    """A frozen config read from one TOML file (see :meth:`from_toml`)."""

    toml_hint: ClassVar[str] = "Fix the file."

    base_dir: Path = Field(Path("."), exclude=True)

    @classmethod
    def from_toml(cls, path: Path) -> Self:
        """Read and validate the file; raise ConfigError listing every problem."""
        path = Path(path)
        raw: dict[str, Any] = read_toml(path)
        raw["base_dir"] = path.resolve().parent
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(
                f"{path} has {exc.error_count()} problem(s):\n" + _describe(exc, cls),
                hint=cls.toml_hint,
            ) from None
