"""The run directory (DESIGN.md): run.json, rounds.jsonl, adapter/, checkpoints/, manifests/, plots/.

Writes are atomic (temp file + rename) so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..common.config import RunConfig
from .records import RoundRecord


def _clean(value: Any) -> Any:
    """Make floats JSON-safe (NaN/inf → null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    """Versions of the code and the stack, for manifests."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "wardround",
        "flwr",
        "torch",
        "transformers",
        "peft",
        "opacus",
        "pydicom",
        "pyarrow",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class RunDirectory:
    """Writes one run's outputs as rounds complete."""

    def __init__(self, root: Path, config: RunConfig) -> None:
        self.root = Path(root)
        self.config = config
        self.root.mkdir(parents=True, exist_ok=True)
        self.rounds_path = self.root / "rounds.jsonl"
        self.rounds_path.unlink(missing_ok=True)
        self.started = time.time()

    def write_round(self, record: RoundRecord, manifest: Mapping[str, Any]) -> None:
        """Append the round to rounds.jsonl and write its manifest."""
        with self.rounds_path.open("a") as handle:
            handle.write(json.dumps(_clean(record.to_json())) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        write_json(self.root / "manifests" / f"round-{record.round:03d}.json", manifest)

    def write_checkpoint(
        self, server_round: int, state: Mapping[str, np.ndarray], sha256: str
    ) -> Path:
        """Save the global adapter after a round (safetensors, no pickle)."""
        from safetensors.numpy import save_file

        folder = self.root / "checkpoints" / f"round-{server_round:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
            str(folder / "adapter.safetensors"),
            metadata={
                "round": str(server_round),
                "sha256": sha256,
                "payload": "weights",
            },
        )
        return folder

    def write_final(self, summary: Mapping[str, Any]) -> None:
        """Write run.json."""
        write_json(self.root / "run.json", summary)

    def write_config(self) -> Path:
        """Save the run config as TOML next to the outputs (to rebuild the base model)."""
        import tomli_w

        path = self.root / "run-config.toml"
        path.write_text(
            tomli_w.dumps(self.config.model_dump(mode="json", by_alias=True))
        )
        return path
