"""What a study's arms train on: the sites' data and the resolved bases.

Synthetic hospitals are written once per size, site count and seed
(``data/patients-P/seed-S/sites-N/``) and shared by every base; ``--sites-dir``
sites are staged as copies of their site.toml under the output folder. The
pretrained base is resolved once, before any arm: ``pretrained`` is the public
synthetic base for the study's shapes (built on first use with init seed 0 and
cached, see :mod:`~wardround.models.public_base`), and every arm of a
pretrained cell, the single-modality ablations included, loads that folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w

from ...server.rundir import write_json
from ...sitedata.site_config import SiteConfig, check_distinct_names
from .cells import OWN_DATA, RANDOM_BASE, Cell, site_tomls_in
from .plan import THIN_CLASS, StudySettings

log = logging.getLogger(__name__)

STUDY_LIFETIME_BUDGET = 1_000_000.0
"""The study's sites' lifetime epsilon budget: every DP arm is a separate run on the
same synthetic patients, and the synthetic default (100) would stop the study
after a few of them. Each run's own limit (``max-epsilon``, 10) still applies."""


@dataclass(frozen=True)
class ResolvedBase:
    """Where a study base is and what identifies it (random: nothing)."""

    folder: Path | None
    identity: dict[str, Any] | None
    """Part of every arm key of its cells: the pretrained layers' hash and the
    manifest's corpus and pretraining settings."""
    manifest: dict[str, Any] | None


def resolve_bases(settings: StudySettings) -> dict[str, ResolvedBase]:
    """Base (as in ``settings.bases``) -> its folder, building the public base once.

    The public base is built from a config with the study's shapes, every
    modality and init seed 0, so its bytes do not depend on which seed (or which
    ``--jobs`` worker) needs it first; concurrent workers wait on its lock.
    """
    from ...models.base_folder import check_fits, layers_sha256, read_manifest
    from ...models.public_base import public_base_folder

    out = {}
    for base in settings.bases:
        if base == RANDOM_BASE:
            out[base] = ResolvedBase(None, None, None)
            continue
        cell = Cell(settings.patients[0], settings.site_counts[0], RANDOM_BASE)
        config = settings.base_config("sites", cell, 0)
        if base == "pretrained":
            folder = public_base_folder(config)
        else:
            folder = Path(base).expanduser().resolve()
        manifest = read_manifest(folder)
        check_fits(folder, manifest, config)
        identity = {
            "layers_sha256": layers_sha256(folder),
            "corpus": manifest.get("corpus"),
            "pretrain": manifest.get("pretrain"),
            "init_seed": manifest.get("init_seed"),
        }
        out[base] = ResolvedBase(folder, identity, manifest)
    return out


def prepare_federation(
    settings: StudySettings, out_dir: Path, patients: int, n_sites: int, seed: int
) -> list[Path]:
    """The synthetic hospitals of one size, site count and seed (written once).

    Every base's cells of that size, site count and seed train on them.
    """
    from ...synthetic.hospitals import synthesize_federation

    if settings.sites_dir is not None:
        return stage_sites(settings, out_dir)
    root = (
        out_dir / "data" / f"patients-{patients}" / f"seed-{seed}" / f"sites-{n_sites}"
    )
    marker = root / "federation.json"
    wanted = {"sites": n_sites, "seed": seed, **settings.data_key(patients)}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(
        json.dumps(wanted)
    ):
        return sorted(root.glob("*/site.toml"))
    marker.unlink(missing_ok=True)
    paths = synthesize_federation(
        root,
        n_sites,
        patients_per_site=patients,
        seed=seed,
        heterogeneity=settings.heterogeneity,
    )
    raise_lifetime_budget(paths)
    write_json(marker, wanted)  # written last: the federation is complete
    return paths


def stage_sites(settings: StudySettings, out_dir: Path) -> list[Path]:
    """Copies of the ``--sites-dir`` sites' site.toml the study runs on.

    The data stay where they are (paths made absolute); the copies put the image
    cache, the privacy ledger and the daemon state under ``out_dir``, so a study
    never writes into a site's folder nor spends its real privacy budget.
    """
    assert settings.sites_dir is not None
    staged = []
    sources = site_tomls_in(Path(settings.sites_dir))
    check_distinct_names(sources)
    for toml in sources:
        SiteConfig.from_toml(toml)  # a site that site check would refuse stops here
        doc = tomllib.loads(toml.read_text())
        home = toml.parent.resolve()
        target = out_dir / "data" / "sites-dir" / toml.parent.name
        data = doc.setdefault("data", {})
        if "dicom-dirs" in data:
            data["dicom-dirs"] = [str(home / d) for d in data["dicom-dirs"]]
        if "ehr-database" in data:  # read from the database: no table path to add
            _absolute_paths(data["ehr-database"], home, ("password-file",))
        else:
            data["ehr"] = str(home / data.get("ehr", "ehr.parquet"))
        if "pacs" in data:
            _absolute_paths(data["pacs"], home, ("ca-file", "password-file"))
        data["cache-dir"] = str(target / "cache")
        privacy = doc.setdefault("privacy", {})
        privacy["ledger-dir"] = str(target / "privacy-ledger")
        doc.setdefault("deployment", {})["state-dir"] = str(target / "state")
        target.mkdir(parents=True, exist_ok=True)
        (target / "site.toml").write_text(tomli_w.dumps(doc))
        staged.append(target / "site.toml")
    # a site that left --sites-dir since an earlier call: its staged copy would
    # join the federation (the arms run on every site.toml there); its cache and
    # ledger stay
    kept = {path.resolve() for path in staged}
    for stale in sorted((out_dir / "data" / "sites-dir").glob("*/site.toml")):
        if stale.resolve() not in kept:
            log.warning(
                "%s is no longer in --sites-dir: its staged copy leaves the study",
                stale.parent.name,
            )
            stale.unlink()
    raise_lifetime_budget(staged)
    return staged


def _absolute_paths(section: dict[str, Any], home: Path, keys: tuple[str, ...]) -> None:
    """Resolve a staged section's file paths against the site's own folder."""
    for key in keys:
        if isinstance(section.get(key), str):
            section[key] = str(home / Path(section[key]).expanduser())


def inspect_sites(settings: StudySettings, out_dir: Path) -> StudySettings:
    """``settings`` with the modalities no ``--sites-dir`` site has, and its data.

    Loads every site's data once (as its ClientApp would) and keys the arms on
    each site's dataset fingerprint, so a changed site reruns its arms.
    """
    from ...client.runtime import get_runtime

    tomls = stage_sites(settings, out_dir)
    cell = Cell(OWN_DATA, len(tomls), RANDOM_BASE)
    config = settings.base_config(str(Path(settings.sites_dir or ".")), cell, 0)
    present = {"image": 0.0, "ehr": 0.0, "note": 0.0}
    fingerprints = {}
    gaps = {}
    decimals = {}
    not_recorded = {}
    thin = {}
    for index, toml in enumerate(tomls):
        runtime = get_runtime(toml, index, config)
        data = runtime.data
        fingerprints[toml.parent.name] = (
            f"{data.fingerprint}:{site_settings_key(runtime.site)}"
        )
        decimals[toml.parent.name] = runtime.site.answers.decimals
        scored = dict.fromkeys(present, 0.0)  # in the split AUROC is measured on
        for dataset in (data.train, data.validation):
            flags = dataset.tensors["present"].sum(0).tolist()
            for name, count in zip(present, flags, strict=True):
                present[name] += count
                if dataset is data.validation:
                    scored[name] += count
        lacking = tuple(name for name, count in scored.items() if count == 0)
        if lacking:
            gaps[toml.parent.name] = lacking
        task = runtime.config.task
        run_names = (*task.labels, *task.numeric, *task.categorical)
        unrecorded = tuple(n for n in run_names if not runtime.site.ehr.records(n))
        if unrecorded:
            not_recorded[toml.parent.name] = unrecorded
        counts = _thin_validation_labels(data.validation, task.labels, unrecorded)
        if counts:
            thin[toml.parent.name] = counts
    missing = {
        name: f"no site has {'images' if name == 'image' else name + 's'}"
        for name, count in present.items()
        if count == 0
    }
    chosen = {m.value for m in getattr(config.model, "modalities", ())}
    for name in present:
        if chosen and name not in chosen:
            missing.setdefault(
                name, f"the run config's model.modalities leaves out {name}"
            )
    return replace(
        settings,
        missing=missing,
        data_identity=fingerprints,
        site_gaps=gaps,
        site_decimals=decimals,
        site_not_recorded=not_recorded,
        site_thin_labels=thin,
    )


def _thin_validation_labels(
    validation: Any, labels: tuple[str, ...], unrecorded: tuple[str, ...]
) -> dict[str, tuple[int, int]]:
    """Label -> (positives, negatives) in a site's validation split, when few.

    Only labels with fewer than ``THIN_CLASS`` examples of a class there; a
    not-recorded label has none and is reported as such instead.
    """
    if not len(validation):
        return {}
    values = validation.tensors["labels"]
    known = validation.tensors["label_known"].bool()
    thin = {}
    for k, name in enumerate(labels):
        if name in unrecorded:
            continue
        positive = int(((values[:, k] > 0.5) & known[:, k]).sum())
        negative = int(((values[:, k] < 0.5) & known[:, k]).sum())
        if min(positive, negative) < THIN_CLASS:
            thin[name] = (positive, negative)
    return thin


def site_settings_key(site: SiteConfig) -> str:
    """A hash of the site.toml settings that change an arm's result, paths left out.

    The site's privacy floor refuses or allows DP arms, its answers round what it
    reports, its split and schema decide its examples: a change reruns its arms.
    """
    settings = {
        "site": site.site.model_dump(mode="json"),
        "privacy": site.privacy.model_dump(mode="json", exclude={"ledger_dir"}),
        "answers": site.answers.model_dump(mode="json"),
        "ehr": site.ehr.model_dump(mode="json"),
        "split": [site.data.validation_fraction, site.data.split_seed],
    }
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def raise_lifetime_budget(
    site_tomls: list[Path], epsilon: float = STUDY_LIFETIME_BUDGET
) -> None:
    """Give synthetic sites a lifetime budget that many runs cannot reach."""
    for site_toml in site_tomls:
        doc = tomllib.loads(site_toml.read_text())
        doc["privacy"]["budget-epsilon"] = epsilon
        site_toml.write_text(tomli_w.dumps(doc))


def describe_base(base: ResolvedBase) -> dict[str, Any] | None:
    """What the report says of a base: where it came from and how it was built."""
    if base.manifest is None:
        return None
    m = base.manifest
    return {
        "folder": base.folder.name if base.folder is not None else None,
        "corpus": m.get("corpus"),
        "corpus_examples": m.get("corpus_examples"),
        "pretrain": m.get("pretrain"),
        "objective": m.get("objective"),
        "init_seed": m.get("init_seed"),
        "loss_first": m.get("loss_first"),
        "loss_last_tenth": m.get("loss_last_tenth"),
        "seconds": m.get("seconds"),
        "layers_sha256": (base.identity or {}).get("layers_sha256"),
    }
