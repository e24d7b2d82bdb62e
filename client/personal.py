"""Personalised sites: the modules each site keeps to itself (``federation.personal``).

Their tensors are left out of what the site sends (``common.adapter.payload_keys``,
so the egress guard refuses them too) and out of what the coordinator aggregates.
The site keeps its own copy per run in its cache folder, loads it over every global
adapter it receives, for training and for evaluation, and replaces it after each
round of training. A restarted daemon picks it up again. A site with a model of
its own (``federation.own-model-weight``, :mod:`.own_model`) keeps it beside them,
the same way.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..common.adapter import is_personal

if TYPE_CHECKING:
    from .runtime import SiteRuntime

log = logging.getLogger(__name__)


def _path(runtime: SiteRuntime, run: str) -> Path:
    # The site's name too: two sites whose site.toml share a cache folder and
    # approve runs of the same settings must not load each other's modules.
    key = f"{runtime.site.site.name}\x1f{run}"
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    return runtime.site.cache_path / "personal" / f"{name}.safetensors"


def own_model_path(runtime: SiteRuntime, run: str) -> Path:
    """Where the site keeps its own model of ``run`` (a whole adapter)."""
    return _path(runtime, run).with_name(_path(runtime, run).stem + ".own.safetensors")


def _earlier_path(runtime: SiteRuntime, run: str) -> Path:
    """Where releases before the site's name was in the key kept a run's modules."""
    name = hashlib.sha256(run.encode()).hexdigest()[:24]
    return runtime.site.cache_path / "personal" / f"{name}.safetensors"


def load_personal(runtime: SiteRuntime, run: str) -> dict[str, np.ndarray]:
    """This site's own tensors of the personal modules for ``run``.

    Empty before its first round of training, or when the run has none.
    """
    personal = runtime.config.federation.personal
    path = _path(runtime, run)
    if personal and not path.is_file() and _earlier_path(runtime, run).is_file():
        # a run under way when the site upgraded keeps its modules
        _earlier_path(runtime, run).replace(path)
    if not personal or not path.is_file():
        return {}
    from safetensors.numpy import load_file

    own = load_file(str(path))
    shapes = runtime.adapter_shapes
    if any(k not in shapes or tuple(v.shape) != shapes[k] for k, v in own.items()):
        log.warning("personal modules in %s do not fit this model; not used", path)
        return {}
    if not _finite(own):
        log.warning(
            "personal modules in %s hold NaN or infinity; not used (the global "
            "adapter's are)",
            path,
        )
        return {}
    return own


def save_personal(
    runtime: SiteRuntime, run: str, state: Mapping[str, np.ndarray]
) -> None:
    """Keep the personal modules' tensors of ``state`` (the trained adapter)."""
    personal = runtime.config.federation.personal
    if not personal:
        return
    own = {k: v for k, v in state.items() if is_personal(k, personal)}
    if not _finite(own):
        # a diverged round: keeping it would make every later round start from NaN
        log.warning(
            "the personal modules diverged (NaN or infinity) this round and are "
            "not kept"
        )
        return
    _write(_path(runtime, run), own)


def load_own_model(runtime: SiteRuntime, run: str) -> dict[str, np.ndarray] | None:
    """This site's own model of ``run``; None before it has trained it once.

    A file that does not fit the model, or holds a NaN or an infinity, is not
    used: the site starts its own model again from the adapter it built.
    """
    path = own_model_path(runtime, run)
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    own = load_file(str(path))
    shapes = runtime.adapter_shapes
    if set(own) != set(shapes) or any(
        tuple(v.shape) != shapes[k] for k, v in own.items()
    ):
        log.warning(
            "the site's own model in %s does not fit this model; not used", path
        )
        return None
    if not _finite(own):
        log.warning("the site's own model in %s holds NaN or infinity; not used", path)
        return None
    return own


def save_own_model(
    runtime: SiteRuntime, run: str, state: Mapping[str, np.ndarray]
) -> bool:
    """Keep the site's own model of ``run``, written whole or not at all.

    A state with a NaN or an infinity (training diverged) is not kept: the site
    goes on with the model it had. Returns whether it was written.
    """
    if not _finite(state):
        log.warning(
            "the site's own model diverged (NaN or infinity) this round and is not kept"
        )
        return False
    _write(own_model_path(runtime, run), state)
    return True


def discard_own_model(runtime: SiteRuntime, run: str) -> None:
    """Remove the site's own model of ``run``: it starts again from the built one."""
    own_model_path(runtime, run).unlink(missing_ok=True)


def _finite(state: Mapping[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in state.values())


def _write(path: Path, state: Mapping[str, np.ndarray]) -> None:
    """Write ``state`` to ``path`` whole or not at all (a temporary file, renamed)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
    tmp.replace(path)
