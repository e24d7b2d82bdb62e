"""Configs read from TOML files: ``site.toml``, ``coordinator.toml`` and run configs.

Each is parsed once, at the edge, the same way: the file is read and every problem
is reported at once as one ConfigError with a hint. For ``site.toml`` and
``coordinator.toml`` the file's folder becomes ``base_dir`` (relative paths in the
file resolve against it). The config classes themselves (``wardround.common.config``)
never touch a file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import Field, ValidationError

from ..common.config import RunConfig, _problems, _Section
from ..common.errors import ConfigError


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file or raise ConfigError saying what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{path} is a folder, not a config file",
            hint="Give the TOML file itself (e.g. the folder's site.toml).",
        )
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", hint="Check the path.")
    raw = path.read_bytes()
    # Windows editors save "UTF-8 with BOM"; the mark is not TOML, the text is
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {exc.start})",
            hint="Save it as UTF-8.",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def load_run_config(path: Path) -> RunConfig:
    """Read and validate a run config TOML file; ConfigError lists every problem."""
    return RunConfig.from_mapping(read_toml(path), source=str(path))


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
                _problems(path, exc, cls),
                hint=cls.toml_hint,
            ) from None
