"""Synthetic hospitals: DICOM studies, an EHR Parquet table and ``site.toml`` per site.

Every patient has latent findings ``z_k ~ Bernoulli(p_k(site, age))`` (nodule,
effusion, pneumonia, cardiomegaly); the labels are those findings. Each modality
shows a partial, noisy view of them, stronger for some findings than others:

============  ======================  =======================  ====================
finding       image                   EHR                      note
============  ======================  =======================  ====================
nodule        strong (blobs)          age only                 weak
effusion      strong (basal band)     weak (BNP, SpO2, HR)     medium
pneumonia     weak (patchy texture)   strong (T, WBC, CRP...)  medium
cardiomegaly  strong (large heart)    strong (BNP, HR)         weak
============  ======================  =======================  ====================

so no single modality predicts all four and a fused model beats each one alone.
Sites differ like hospitals: prevalence, age mix, scanner intensity scale, offset
and noise, modality mix, note style, folder layout and (for some) EHR column names.
Each EHR row also carries a report and a question-answer pair written from the
patient's findings (:mod:`.reports`), for generative models.
A :class:`~.shift.Heterogeneity` makes them differ more, by stated amounts
(label skew, scanner shift, note dialect), for studies of non-IID federations.
Everything is drawn from ``numpy.random.Generator`` streams seeded by
``(seed, site index)``: the same seed gives byte-identical EHR files and identical
DICOM pixel data and UIDs.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tomli_w

from ..common.errors import ConfigError
from .dicom import Scanner, Study, encode_pixels, make_uid, write_study
from .image import chest_phantom
from .notes import FINDINGS, NoteStyle, write_note
from .reports import (
    RENAMED_TEXT_COLUMNS,
    TEXT_COLUMNS,
    add_text_columns,
    text_stream,
)
from .shift import Heterogeneity, apply_heterogeneity

logger = logging.getLogger(__name__)

MARKER = ".wardround-synth"
GENERATOR_VERSION = 2  # raised when the same settings write other data (keys caches)

#: P(pattern drawn | finding present), P(pattern drawn | finding absent)
IMAGE_SHOW = {
    "nodule": (0.80, 0.06),
    "effusion": (0.75, 0.10),
    "pneumonia": (0.40, 0.08),
    "cardiomegaly": (0.72, 0.10),
}
#: log-odds change of prevalence per 15 years of age above 60
AGE_EFFECT = {"nodule": 0.4, "effusion": 0.3, "pneumonia": 0.2, "cardiomegaly": 0.6}

#: run feature name -> column name, for sites that use their own EHR schema
RENAMED_FEATURES = {
    "age": "AGE_YEARS",
    "sex": "gender",
    "temperature": "Temp_C",
    "heart_rate": "HR_bpm",
    "spo2": "SpO2_pct",
    "wbc": "WBC_x10e9_L",
    "crp": "CRP_mg_L",
    "bnp": "NT_proBNP_pg_mL",
}
RENAMED_LABELS = {name: f"finding_{name}" for name in FINDINGS}
RENAMED_KEYS = {
    "patient_id": "mrn",
    "study_uid": "accession_study_uid",
    "note": "clinical_note",
}

_SURNAMES = (
    "ALDER",
    "BIRCH",
    "CEDAR",
    "DUNE",
    "ELM",
    "FERN",
    "GROVE",
    "HEATH",
    "IVY",
    "JUNIPER",
    "KESTREL",
    "LARCH",
    "MOSS",
    "NETTLE",
    "OAK",
    "PINE",
    "REED",
    "SAGE",
)
_GIVEN = {
    "F": ("ANNA", "BEA", "CLARA", "DORA", "EVA", "FAYE", "GINA", "HANNA"),
    "M": ("ALEX", "BEN", "CARL", "DAN", "ERIK", "FINN", "GUS", "HUGO"),
}


@dataclass(frozen=True)
class SiteProfile:
    """What makes one synthetic hospital unlike another."""

    index: int
    prevalence: dict[str, float]
    age_mean: float
    age_sd: float
    modality_mix: dict[str, float]
    scanner: Scanner
    note_style: NoteStyle
    layout: int
    renamed: bool
    extra_columns: bool = True
    institution: str = field(default="")
    note_vocabulary: dict[str, tuple[str, ...]] | None = None
    """The cue phrases this site's notes use (None: every phrase of its style)."""

    @property
    def name(self) -> str:
        """Folder and site name: ``site-01``, ``site-02``, ..."""
        return f"site-{self.index + 1:02d}"


_PRESETS = (
    dict(
        prevalence=(0.15, 0.25, 0.35, 0.20),
        age=(58.0, 16.0),
        mix={"CT": 0.45, "CR": 0.2, "DX": 0.2, "MR": 0.15},
        scanner=Scanner(scale=1.0, offset=0.0, noise=0.02, cr_window=True),
        style=NoteStyle.TERSE,
    ),
    dict(
        prevalence=(0.25, 0.15, 0.20, 0.35),
        age=(70.0, 12.0),
        mix={"CT": 0.25, "CR": 0.6, "DX": 0.0, "MR": 0.15},
        scanner=Scanner(
            scale=0.88,
            offset=0.04,
            noise=0.05,
            multi_window=True,
            cr_window=False,
            monochrome1_fraction=0.5,
        ),
        style=NoteStyle.FULL,
    ),
    dict(
        prevalence=(0.20, 0.32, 0.25, 0.15),
        age=(52.0, 18.0),
        mix={"CT": 0.3, "CR": 0.0, "DX": 0.55, "MR": 0.15},
        scanner=Scanner(scale=1.1, offset=-0.03, noise=0.035, monochrome1_fraction=0.2),
        style=NoteStyle.TEMPLATE,
    ),
)


def site_profile(index: int, seed: int) -> SiteProfile:
    """Return the profile of site ``index`` (0-based): presets, then drawn ones."""
    base: dict[str, Any] = _PRESETS[index % len(_PRESETS)]
    prevalence = dict(zip(FINDINGS, base["prevalence"], strict=True))
    age_mean, age_sd = base["age"]
    mix, scanner, style = base["mix"], base["scanner"], base["style"]
    if index >= len(_PRESETS):
        rng = np.random.default_rng([seed, index, 7])
        prevalence = {
            k: float(np.clip(v * rng.uniform(0.6, 1.5), 0.05, 0.6))
            for k, v in prevalence.items()
        }
        age_mean = float(age_mean + rng.uniform(-6, 6))
        scanner = Scanner(
            scale=float(rng.uniform(0.85, 1.15)),
            offset=float(rng.uniform(-0.04, 0.04)),
            noise=float(rng.uniform(0.02, 0.06)),
            multi_window=bool(rng.random() < 0.5),
            cr_window=bool(rng.random() < 0.5),
            monochrome1_fraction=float(rng.choice([0.0, 0.3, 0.6])),
        )
    return SiteProfile(
        index=index,
        prevalence=prevalence,
        age_mean=age_mean,
        age_sd=age_sd,
        modality_mix=mix,
        scanner=scanner,
        note_style=style,
        layout=index % 3,
        renamed=index % 3 == 1,
        institution=f"SYNTHETIC HOSPITAL {index + 1:02d}",
    )


def synthesize_federation(
    out_dir: Path,
    n_sites: int,
    *,
    patients_per_site: int = 300,
    seed: int = 0,
    heterogeneity: Heterogeneity | None = None,
    image_less_sites: int = 0,
) -> list[Path]:
    """Write n_sites synthetic hospitals under out_dir/site-01, site-02, ...

    ``heterogeneity`` makes the sites differ more than the presets do (None: the
    presets alone). The last ``image_less_sites`` sites have no imaging: no DICOM
    folder and no ``data.dicom-dirs``, the same EHR table and notes as with images.
    Returns the site.toml paths, one per site, in site order.
    """
    if n_sites < 1:
        raise ConfigError(f"--sites must be at least 1 (got {n_sites})")
    if patients_per_site < 10:
        raise ConfigError(f"--patients must be at least 10 (got {patients_per_site})")
    if not 0 <= image_less_sites <= n_sites:
        raise ConfigError(
            f"--image-less-sites {image_less_sites} is not 0 to {n_sites}"
        )
    out_dir = Path(out_dir)
    paths = []
    for index in range(n_sites):
        profile = site_profile(index, seed)
        if heterogeneity is not None:
            profile = apply_heterogeneity(profile, heterogeneity, seed)
        images = index < n_sites - image_less_sites
        site_dir = out_dir / profile.name
        paths.append(write_site(site_dir, profile, patients_per_site, seed, images))
    logger.info("wrote %d synthetic sites under %s", n_sites, out_dir)
    return paths


def _prepare_folder(site_dir: Path) -> None:
    if site_dir.exists() and any(site_dir.iterdir()):
        if not (site_dir / MARKER).is_file():
            raise ConfigError(
                f"{site_dir} exists and was not written by `wardround synth`",
                hint="Choose an empty --out folder; synth overwrites only its sites.",
            )
        shutil.rmtree(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / MARKER).write_text("written by wardround synth; safe to delete\n")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _draw_patients(profile: SiteProfile, n: int, rng: np.random.Generator) -> dict:
    age = np.clip(np.rint(rng.normal(profile.age_mean, profile.age_sd, n)), 18, 97)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    z = {}
    for name in FINDINGS:
        p = profile.prevalence[name]
        logit = np.log(p / (1 - p)) + AGE_EFFECT[name] * (age - 60.0) / 15.0
        z[name] = (rng.random(n) < _sigmoid(logit)).astype(np.int64)
    pn, cm, ef = z["pneumonia"], z["cardiomegaly"], z["effusion"]
    temp = 36.9 + 0.5 * pn + 0.15 * ef + rng.normal(0, 0.6, n)
    hr = 80 + 6 * pn + 5 * cm + 4 * ef + rng.normal(0, 12, n)
    spo2 = np.minimum(
        100, 96.5 - 1.6 * pn - 1.0 * ef - 0.8 * cm + rng.normal(0, 2.2, n)
    )
    wbc = 7.5 * np.exp(0.2 * pn + 0.05 * ef + rng.normal(0, 0.35, n))
    crp = 8.0 * np.exp(0.8 * pn + 0.3 * ef + rng.normal(0, 1.0, n))
    bnp = 90.0 * np.exp(
        1.0 * cm + 0.5 * ef + 0.015 * (age - 60) + rng.normal(0, 0.75, n)
    )
    values = {
        "age": age,
        "temperature": np.round(temp, 1),
        "heart_rate": np.rint(hr),
        "spo2": np.rint(spo2),
        "wbc": np.round(wbc, 1),
        "crp": np.round(crp, 1),
        "bnp": np.rint(bnp),
    }
    missing = {
        "age": 0.01,
        "temperature": 0.05,
        "heart_rate": 0.04,
        "spo2": 0.05,
        "wbc": 0.06,
        "crp": 0.1,
        "bnp": 0.2,
    }
    masks = {k: rng.random(n) < missing[k] for k in values}
    sex_missing = rng.random(n) < 0.03
    return {
        "n": n,
        "age": age.astype(int),
        "sex": sex,
        "sex_missing": sex_missing,
        "z": z,
        "values": values,
        "missing": masks,
    }


def write_site(
    site_dir: Path, profile: SiteProfile, n: int, seed: int, images: bool = True
) -> Path:
    """Write one synthetic hospital (``images`` false: EHR and notes only)."""
    _prepare_folder(site_dir)
    ss = np.random.SeedSequence([seed, profile.index])
    rng_pat, rng_img, rng_note, rng_ehr = (
        np.random.default_rng(s) for s in ss.spawn(4)
    )

    n_ehr_only = max(1, round(0.03 * n))
    pats = _draw_patients(profile, n + n_ehr_only, rng_pat)
    total = pats["n"]
    ids = 1_000_000 + rng_pat.choice(8_999_999, size=total, replace=False)
    prefix = ("", "MRN", "H")[profile.layout]
    patient_ids = [f"{prefix}{i}" for i in ids]
    study_uids = [make_uid(seed, profile.name, pid, "study") for pid in patient_ids]
    mods = list(profile.modality_mix)
    probs = np.array([profile.modality_mix[m] for m in mods], float)
    modality = rng_pat.choice(mods, size=total, p=probs / probs.sum())
    days = rng_pat.integers(0, 3 * 365, total)
    minutes = rng_pat.integers(7 * 60, 20 * 60, total)

    dicom_root = site_dir / "dicom"
    for i in range(n if images else 0):  # the last n_ehr_only have no images here
        shows = {
            k: bool(rng_img.random() < IMAGE_SHOW[k][1 - pats["z"][k][i]])
            for k in FINDINGS
        }
        density = chest_phantom(rng_img, **shows)
        study = _study(
            profile,
            seed,
            i,
            patient_ids[i],
            study_uids[i],
            str(modality[i]),
            pats,
            int(days[i]),
            int(minutes[i]),
            rng_img,
        )
        enc = encode_pixels(density, study.modality, profile.scanner, rng_img)
        write_study(dicom_root / _layout_path(profile.layout, study, i), study, enc)

    table = _ehr_table(profile, pats, patient_ids, study_uids, n, rng_note, rng_ehr)
    table = add_text_columns(
        table,
        RENAMED_KEYS["patient_id"] if profile.renamed else "patient_id",
        patient_ids,
        pats["z"],
        text_stream(seed, profile.index),
        RENAMED_TEXT_COLUMNS if profile.renamed else TEXT_COLUMNS,
    )
    pq.write_table(table, site_dir / "ehr.parquet")
    toml_path = site_dir / "site.toml"
    with toml_path.open("wb") as handle:
        tomli_w.dump(_site_toml(profile, seed, images=images), handle)
    return toml_path


def _study(profile, seed, i, pid, study_uid, modality, pats, day, minute, rng) -> Study:
    sex = "O" if pats["sex_missing"][i] else str(pats["sex"][i])
    given = _GIVEN.get(sex, _GIVEN["F"])
    date = np.datetime64("2023-01-01") + np.timedelta64(day, "D")
    age = int(pats["age"][i])
    birth = np.datetime64(f"{date.astype(object).year - age}-01-01") + np.timedelta64(
        int(rng.integers(0, 365)), "D"
    )
    body = "CHEST" if rng.random() < 0.9 or modality == "CT" else "THORAX"
    return Study(
        patient_id=pid,
        patient_name=f"{_SURNAMES[int(rng.integers(len(_SURNAMES)))]}^"
        f"{given[int(rng.integers(len(given)))]}",
        sex=sex,
        birth_date=str(birth).replace("-", ""),
        age=age,
        study_uid=study_uid,
        series_uid=make_uid(seed, profile.name, pid, "series"),
        sop_uid=make_uid(seed, profile.name, pid, "sop"),
        accession=f"A{profile.index + 1:02d}{i:06d}",
        study_date=str(date).replace("-", ""),
        study_time=f"{minute // 60:02d}{minute % 60:02d}00",
        modality=modality,
        body_part=body,
        institution=profile.institution,
    )


def _layout_path(layout: int, study: Study, i: int) -> Path:
    if layout == 0:  # PACS export: patient / study / instance.dcm
        return Path(study.patient_id) / study.study_uid / "1.dcm"
    if layout == 1:  # date / accession / IMnnnnnn, no extension
        d = study.study_date
        return Path(d[:4]) / d[4:6] / study.accession / "IM000001"
    return Path(study.modality) / f"{study.patient_id}_{study.accession}.dcm"


def _ehr_table(profile, pats, patient_ids, study_uids, n_imaged, rng_note, rng_ehr):
    total = pats["n"]
    # a few imaged studies never reached the EHR extract
    drop = set(
        rng_ehr.choice(n_imaged, size=max(1, round(0.03 * n_imaged)), replace=False)
    )
    rows = [i for i in range(total) if i not in drop]
    rows = [rows[j] for j in rng_ehr.permutation(len(rows))]  # export order

    notes: list[str | None] = []
    for i in range(total):
        sex = None if pats["sex_missing"][i] else str(pats["sex"][i])
        z = {k: int(pats["z"][k][i]) for k in FINDINGS}
        text = write_note(
            z,
            int(pats["age"][i]),
            sex,
            profile.note_style,
            rng_note,
            profile.note_vocabulary,
        )
        u = rng_note.random()
        notes.append(None if u < 0.03 else "" if u < 0.09 else text)

    cols = RENAMED_KEYS if profile.renamed else {k: k for k in RENAMED_KEYS}
    feats = RENAMED_FEATURES if profile.renamed else {k: k for k in RENAMED_FEATURES}
    labels = RENAMED_LABELS if profile.renamed else {k: k for k in FINDINGS}
    data: dict[str, pa.Array] = {
        cols["patient_id"]: pa.array([patient_ids[i] for i in rows], pa.string()),
        cols["study_uid"]: pa.array([study_uids[i] for i in rows], pa.string()),
    }
    if profile.extra_columns:
        data["encounter"] = pa.array(
            [("ED", "inpatient", "outpatient")[i % 3] for i in rows], pa.string()
        )
    for name, values in pats["values"].items():
        miss = pats["missing"][name]
        kind = pa.int64() if name in ("age", "heart_rate", "spo2") else pa.float64()
        py = [None if miss[i] else values[i].item() for i in rows]
        data[feats[name]] = pa.array(
            [
                None if v is None else int(v) if kind == pa.int64() else float(v)
                for v in py
            ],
            kind,
        )
    data[feats["sex"]] = pa.array(
        [None if pats["sex_missing"][i] else str(pats["sex"][i]) for i in rows],
        pa.string(),
    )
    data[cols["note"]] = pa.array([notes[i] for i in rows], pa.string())
    for name in FINDINGS:
        data[labels[name]] = pa.array(
            [int(pats["z"][name][i]) for i in rows], pa.int64()
        )
    return pa.table(data)


def _site_toml(profile: SiteProfile, seed: int, *, images: bool = True) -> dict:
    doc: dict = {
        "site": {"name": profile.name},
        "data": {
            **({"dicom-dirs": ["dicom"]} if images else {}),  # none: no imaging
            "ehr": "ehr.parquet",
            "cache-dir": ".wardround-cache",
            "validation-fraction": 0.2,
            "split-seed": seed,
        },
        # The site's own floor: no run may spend more than max-epsilon here, and
        # every run together no more than budget-epsilon (composed in the ledger).
        # Synthetic patients allow runs without DP (ablations); a real site.toml
        # defaults to required = true.
        "privacy": {
            "required": False,
            "max-epsilon": 10.0,
            "budget-epsilon": 100.0,
            "min-noise-multiplier": 0.3,
            "ledger-dir": "privacy-ledger",
        },
    }
    if profile.renamed:
        doc["ehr"] = {
            "patient-id": RENAMED_KEYS["patient_id"],
            "study-uid": RENAMED_KEYS["study_uid"],
            "note": RENAMED_KEYS["note"],
            "features": dict(RENAMED_FEATURES),
            "labels": dict(RENAMED_LABELS),
            **RENAMED_TEXT_COLUMNS,
        }
    else:
        doc["ehr"] = {
            "patient-id": "patient_id",
            "study-uid": "study_uid",
            "note": "note",
            **TEXT_COLUMNS,
        }
    return doc
