"""Describing what is wrong with a config, every problem at once."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .model import FAMILY_CONFIGS
from .sections import shown_text

_SCALAR_BRANCHES = {"str", "int", "float", "bool"}
"""pydantic's names for the scalar side of a ``str | Spec`` union in an error's loc."""


def _describe(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc, family = _untagged(model, err["loc"])
        loc, scalar_branch = _without_union_branches(loc)
        if scalar_branch and isinstance(err.get("input"), dict):
            continue  # a table was written: the table side's errors say what is wrong
        # a key is the config's own text: escaped when it holds a control character
        where = ".".join(shown_text(p) for p in loc) or "(top level)"
        msg = re.sub(
            r" or instance of \w+", "", str(err["msg"]).removeprefix("Value error, ")
        )
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {where}: {_unknown_key(model, loc, family)}")
        elif not loc:
            # a check across sections: its input is the whole config, not worth echoing
            lines.append(f"  - {where}: {msg}")
        elif isinstance(err.get("input"), dict):
            # a whole section: it may hold a url with a token; the keys say enough
            lines.append(f"  - {where}: {msg}")
        else:
            lines.append(f"  - {where}: {msg} (got {err.get('input')!r})")
            if err["type"] == "string_type":
                lines[-1] += f'; write it in quotes: "{err.get("input")}"'
    return "\n".join(lines)


def _problems(source: Any, exc: ValidationError, model: type[BaseModel]) -> str:
    """``source`` has N problem(s), then each on a line."""
    described = _describe(exc, model)
    return f"{source} has {described.count(chr(10)) + 1} problem(s):\n{described}"


def _without_union_branches(loc: list[Any]) -> tuple[list[Any], bool]:
    """``loc`` without the union members pydantic names in it.

    Also says whether it named a scalar member (``str`` of ``str | FeatureSpec``).
    """
    kept, scalar = [], False
    for part in loc:
        if isinstance(part, str) and part in _SCALAR_BRANCHES:
            scalar = True
            continue
        if isinstance(part, str) and ("[" in part or part[:1].isupper()):
            continue  # function-after[_check(), FeatureSpec], or a class name
        kept.append(part)
    return kept, scalar


def _untagged(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[Any], str]:
    """``loc`` without the model family's tag pydantic puts in it, and that family."""
    parts, family = list(loc), ""
    if len(parts) > 1 and parts[1] in FAMILY_CONFIGS:
        union = _section(model, parts[:1])  # a union of family configs is no class
        if union is not None and not isinstance(union, type):
            family = parts.pop(1)
    return parts, family


def _section(model: type[BaseModel], loc: list[Any]) -> Any:
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", {})
        match = next((f for name, f in fields.items() if part in (name, f.alias)), None)
        if match is None:
            return None
        current = match.annotation
    return current


def _unknown_key(model: type[BaseModel], loc: list[Any], family: str) -> str:
    """Say which family takes a key of the model section, or list the known keys."""
    section: Any = FAMILY_CONFIGS[family] if family else _section(model, loc[:-1])
    if family:
        key = str(loc[-1])
        owners = [
            name
            for name, other in FAMILY_CONFIGS.items()
            if name != family and key in _keys(other) | set(other.model_fields)
        ]
        if owners:
            takes = " or ".join(repr(name) for name in owners)
            return (
                f"a key of model.family {takes}, and this model's family is "
                f"{family!r}: set model.family = {owners[0]!r}, or remove the key"
            )
    known = sorted(_keys(section)) if isinstance(section, type) else []
    return f"unknown key; known keys here: {', '.join(known)}"


def _keys(section: type[BaseModel]) -> set[str]:
    """The keys a file may write: not the ones set by the reader (``exclude``)."""
    return {
        f.alias or name for name, f in section.model_fields.items() if not f.exclude
    }


def flower_config_string(value: str) -> str:
    """``value`` quoted for Flower's ``key=value`` arguments (``--node-config``, ``--run-config``).

    Flower reads each value as TOML after splitting on a regular expression that
    ends a quoted value at its first closing quote: single quotes (literal, no
    escapes) unless the value holds one, else double quotes with escaped backslashes.
    """
    if "\n" in value or ("'" in value and '"' in value):
        raise ConfigError(
            f"the path {value!r} cannot be passed to Flower (it holds a newline, or "
            "both ' and \")",
            hint="Use a path without quote characters or newlines.",
        )
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\") + '"'
