"""The machine's wardround cache: work that is pure in its inputs, kept across runs.

``$WARDROUND_CACHE`` if set, else ``$XDG_CACHE_HOME/wardround`` or
``~/.cache/wardround``. Nothing in it is a record: deleting it costs only time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get("WARDROUND_CACHE"):
        return Path(os.environ["WARDROUND_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wardround"
