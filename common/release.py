"""A site's wardround release as wire metrics (numbers only), and back."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from packaging.version import InvalidVersion, Version

from . import wire

_LARGEST_PART = 10**6
"""Larger numbers are not a release a site runs: read back as unknown."""


def version_metrics(version: str) -> dict[str, int]:
    """``version``'s major, minor and patch numbers under their wire names.

    A pre-release or local suffix does not travel (``0.2.0rc1`` leaves as 0.2.0);
    a version that does not parse leaves nothing.
    """
    try:
        release = Version(version).release
    except InvalidVersion:
        return {}
    parts = (*release, 0, 0)[:3]
    return dict(zip(wire.VERSION_METRICS, parts, strict=True))


def version_from_metrics(metrics: Mapping[str, Any]) -> str | None:
    """The ``major.minor.patch`` a reply states, or None when it states none."""
    parts = []
    for name in wire.VERSION_METRICS:
        value = metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, Real):
            return None
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            return None
        if not 0 <= number < _LARGEST_PART:
            return None
        parts.append(str(int(number)))
    return ".".join(parts)
