"""Machine hygiene for Flower and Ray, applied by entry points and test fixtures.

Called explicitly (never at import) before Flower or Ray start: telemetry and update
checks off, Ray bound to loopback, no per-run dependency installation, and private
state directories so runs do not share or leak state.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Ray puts sockets at RAY_TMPDIR/ray/session_<timestamp>_<pid>/sockets/plasma_store
# (about 75 bytes below RAY_TMPDIR); AF_UNIX paths stop at 107 bytes.
_MAX_RAY_TMPDIR = 30


def _short_ray_dir(preferred: Path) -> str:
    if len(str(preferred)) <= _MAX_RAY_TMPDIR:
        return str(preferred)
    made = tempfile.mkdtemp(prefix="wr-ray-")
    # The command that made it removes it (Ray has stopped by then); a child that
    # inherits RAY_TMPDIR makes none and removes none.
    atexit.register(shutil.rmtree, made, ignore_errors=True)
    return made


_FIXED = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray otherwise binds a non-loopback address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # The SuperLink otherwise re-installs dependencies per run (a multi-GB CUDA torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Keep Ray from rewriting CUDA_VISIBLE_DEVICES for CPU-only actors (and its warning).
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
}


def apply_machine_hygiene(state_dir: Path) -> dict[str, str]:
    """Set the environment Flower and Ray need; return what was set.

    Parameters
    ----------
    state_dir : Path
        A private directory for ``FLWR_HOME`` and ``RAY_TMPDIR``. An existing
        ``FLWR_HOME``/``RAY_TMPDIR`` set by the user is kept.
    """
    state_dir = Path(state_dir).resolve()
    values = dict(_FIXED)
    values["FLWR_HOME"] = os.environ.get("FLWR_HOME") or str(state_dir / "flwr-home")
    # Ray's socket paths must stay short (AF_UNIX limit of 107 bytes).
    values["RAY_TMPDIR"] = os.environ.get("RAY_TMPDIR") or _short_ray_dir(
        state_dir / "ray"
    )
    for key, value in values.items():
        os.environ[key] = value
    Path(values["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    Path(values["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return values
