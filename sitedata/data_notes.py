"""What loading a site's data for training found, kept beside its caches.

The data loader runs where the site trains: in a simulation, inside a Ray worker
whose log the researcher never sees. It leaves a small note in the site's cache
folder (counts and fixed-vocabulary reasons only, never a value from the data)
that ``wardround simulate`` reads back and prints under its table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DATA_NOTES = "data-notes.json"


def write_data_notes(
    cache_dir: Path, *, studies: int, image_failures: Mapping[str, int]
) -> None:
    """Record what this load found (replacing the last note; best effort)."""
    note = {
        "written": time.time(),
        "studies": int(studies),
        "image_failures": {str(k): int(v) for k, v in sorted(image_failures.items())},
    }
    path = Path(cache_dir) / DATA_NOTES
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(note, indent=1))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache keeps no note: not an error


def read_data_notes(cache_dir: Path, since: float) -> dict[str, Any] | None:
    """The note of a load at or after ``since`` (a time.time()), else None."""
    try:
        note = json.loads((Path(cache_dir) / DATA_NOTES).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or float(note.get("written", 0)) < since:
        return None
    return note


def describe_data_notes(site: str, note: Mapping[str, Any]) -> list[str]:
    """Lines for the researcher: what trained differently from what the data holds."""
    failures = {str(k): int(v) for k, v in note.get("image_failures", {}).items()}
    if not failures:
        return []
    reasons = ", ".join(f"{count} {reason}" for reason, count in failures.items())
    return [
        f"{site}: {sum(failures.values())} of {note.get('studies', '?')} studies "
        f"trained without their image, which could not be decoded ({reasons}); "
        "`wardround site check` names the files"
    ]
