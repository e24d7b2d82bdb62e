"""The public pretrained base: encoders aligned on a public synthetic population.

``model.base = "pretrained"`` (the default) names this base. It is built from the
run config's shapes on first use and cached (``$WARDROUND_CACHE``, else
``$XDG_CACHE_HOME/wardround``, else ``~/.cache/wardround``), so every later run,
study arm and simulated site reuses it. The corpus is a *public* synthetic
population: its own seed (never one a study or ``wardround simulate`` uses), its
own site count and heterogeneity, and its labels are never read. Real
federations name a base folder built from public data (``wardround pretrain
--corpus``), or Hugging Face checkpoints (``model.vision``, ``model.text``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..common.config import FusionModelConfig, Modality, RunConfig
from ..common.errors import ConfigError
from ..ops.cache_dir import cache_root
from ..ops.file_lock import exclusive_lock
from ..synthetic.shift import Heterogeneity
from .base_folder import MANIFEST, base_shapes, save_base
from .pretraining import PretrainSettings, pretrain_encoders

logger = logging.getLogger(__name__)

PUBLIC_HETEROGENEITY = Heterogeneity(
    label_skew=0.5, scanner_shift=0.25, scanner_noise=(0.01, 0.1), note_dialect=0.3
)
"""Unlike the study's (label skew 1.0, scanner shift 0.15, dialect 0.5)."""


@dataclass(frozen=True)
class PublicCorpus:
    """The public synthetic population the default base is pretrained on."""

    seed: int = 1_000_003
    sites: int = 4
    patients_per_site: int = 1500
    heterogeneity: Heterogeneity = field(default=PUBLIC_HETEROGENEITY)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (manifests, cache keys)."""
        return {**asdict(self), "heterogeneity": self.heterogeneity.as_dict()}


def base_key(
    config: RunConfig, corpus: PublicCorpus, settings: PretrainSettings
) -> str:
    """What decides the public base's bytes: shapes, corpus, pretraining, init."""
    from ..synthetic.hospitals import GENERATOR_VERSION

    payload = {
        "generator": GENERATOR_VERSION,
        "shapes": base_shapes(config),
        "modalities": [m.value for m in FusionModelConfig.of(config).modalities],
        "corpus": corpus.as_dict(),
        "pretrain": settings.as_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


DEFAULT_CORPUS = PublicCorpus()
DEFAULT_PRETRAINING = PretrainSettings()


def public_base_path(
    config: RunConfig,
    corpus: PublicCorpus = DEFAULT_CORPUS,
    settings: PretrainSettings = DEFAULT_PRETRAINING,
) -> Path:
    """Where the public base for ``config``'s shapes is cached (built or not)."""
    return (
        cache_root()
        / "bases"
        / f"public-synthetic-{base_key(config, corpus, settings)}"
    )


def public_base_folder(
    config: RunConfig,
    corpus: PublicCorpus = DEFAULT_CORPUS,
    settings: PretrainSettings = DEFAULT_PRETRAINING,
) -> Path:
    """The cached public base for ``config``'s shapes, built first if missing.

    Concurrent callers (a simulation's sites) wait on one lock; the base is
    written to a staging folder and renamed, so a half-built base is never used.
    A build killed before it finished (SIGTERM skips the cleanup) leaves its
    staging folder; the next build of that base on the same host removes it once
    its process is gone (a cache shared between hosts keeps the others' folders).
    """
    folder = public_base_path(config, corpus, settings)
    if (folder / MANIFEST).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.with_suffix(".lock")):
        if (folder / MANIFEST).is_file():
            return folder
        logger.info("building the public pretrained base in %s (first use)", folder)
        _remove_killed_builds(folder)
        scratch = folder.with_name(f"{_staging_prefix(folder)}{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)  # a killed build had this PID
        scratch.mkdir()
        try:
            staging = scratch / "base"
            build_public_base(config, staging, scratch / "corpus", corpus, settings)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _staging_prefix(folder: Path) -> str:
    """The staging folders of ``folder``'s builds on this host: the prefix, then a PID."""
    return f"{folder.name}.partial-{socket.gethostname()}-"


def _remove_killed_builds(folder: Path) -> None:
    """Remove this host's staging folders of ``folder`` whose build process is gone."""
    prefix = _staging_prefix(folder)
    for leftover in folder.parent.glob(glob.escape(prefix) + "*"):
        pid = leftover.name[len(prefix) :]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_public_corpus_fits(config: RunConfig) -> None:
    """ConfigError when the synthetic corpus cannot feed ``config``'s task."""
    default = RunConfig().task
    task = config.task
    if (dict(task.numeric), dict(task.categorical)) != (
        dict(default.numeric),
        dict(default.categorical),
    ):
        raise ConfigError(
            "model.base 'pretrained' is pretrained on the public synthetic corpus, "
            "whose EHR has the default task's features; this run's task has others",
            hint="Pretrain a base on public data with your task's features "
            "(`wardround pretrain --corpus DIR --config RUN.toml --out FOLDER`) and "
            "name the folder in model.base, or set model.base = 'random'.",
        )


def build_public_base(
    config: RunConfig,
    out: Path,
    corpus_dir: Path,
    corpus: PublicCorpus = DEFAULT_CORPUS,
    settings: PretrainSettings = DEFAULT_PRETRAINING,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Synthesize the public corpus into ``corpus_dir``, pretrain, write ``out``."""
    from ..synthetic.hospitals import synthesize_federation

    check_public_corpus_fits(config)
    start = time.perf_counter()
    synthesize_federation(
        corpus_dir,
        corpus.sites,
        patients_per_site=corpus.patients_per_site,
        seed=corpus.seed,
        heterogeneity=corpus.heterogeneity,
    )
    site_tomls = sorted(corpus_dir.glob("*/site.toml"))
    source = {"kind": "public-synthetic", **corpus.as_dict()}
    manifest = pretrain_base(config, site_tomls, out, settings, source, on_step)
    logger.info("public base built in %.1f s", time.perf_counter() - start)
    return manifest


def pretrain_base(
    config: RunConfig,
    site_tomls: list[Path],
    out: Path,
    settings: PretrainSettings,
    source: dict[str, Any],
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Pretrain ``config``'s random base on the corpus sites; write it to ``out``."""
    from ..sitedata.dataset import TensorDictDataset, load_site_data_for_run
    from ..sitedata.site_config import SiteConfig
    from .fusion import build_base

    mc = FusionModelConfig.of(config)
    modalities = set(mc.modalities)
    if len(modalities) < 2 and not (
        Modality.IMAGE in modalities and settings.image_views
    ):
        raise ConfigError(
            "pretraining aligns modalities with each other (and images with their "
            f"own views); a model of {', '.join(m.value for m in modalities)} alone "
            "has nothing to align",
            hint="Pretrain with at least two of image, ehr, note in model.modalities, "
            "or use model.base = 'random' for this model.",
        )
    import torch

    random_config = config.with_overrides(model={"base": "random"})
    datasets = []
    for toml in site_tomls:
        data = load_site_data_for_run(SiteConfig.from_toml(toml), config.task, config)
        # Every corpus example is used: the split only matters for the task.
        parts = [data.train.tensors, data.validation.tensors]  # type: ignore[attr-defined]
        datasets.append(
            TensorDictDataset(
                {
                    k: torch.cat([p[k] for p in parts])
                    for k in parts[0]
                    if k not in ("labels", "label_known")
                }
            )
        )
    model, _ = build_base(random_config)
    start = time.perf_counter()
    losses = pretrain_encoders(model, datasets, settings, on_step)
    seconds = time.perf_counter() - start
    tail = losses[-max(len(losses) // 10, 1) :]
    manifest = {
        "shapes": base_shapes(config),
        "modalities": [m.value for m in mc.modalities],
        "init_seed": mc.init_seed,
        "corpus": source,
        "corpus_examples": [len(d) for d in datasets],
        "pretrain": settings.as_dict(),
        "objective": "cross-modal InfoNCE (image-EHR, image-note, EHR-note)"
        + (
            " + SimCLR on two augmented views of each image"
            if settings.image_views
            else ""
        ),
        "loss_first": losses[0] if losses else None,
        "loss_last_tenth": sum(tail) / len(tail) if tail else None,
        "seconds": round(seconds, 1),
    }
    if out.exists():
        shutil.rmtree(out)
    save_base(model, out, manifest)
    return manifest
