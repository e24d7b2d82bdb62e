"""``wardround site check``: what a site has, what is wrong with it, what to fix.

:func:`check_site` runs the same path as training (index, EHR schema and values,
join, image decoding, fingerprint) but collects every problem instead of stopping
at the first. The report stays on the site: it is for the operator and may name
columns, modalities and body parts; it never holds patient values.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..common.config import RunConfig, TaskConfig, TaskKind
from ..common.errors import PrivacyPolicyRefused, WardroundError
from ..sitedata.dataset import ehr_present, prepare_site, split_patients
from ..sitedata.decode import (
    FOLDER_NO_PERMISSION,
    NO_PERMISSION,
    OK,
    transfer_syntax_name,
)
from ..sitedata.dicom_index import not_folders
from ..sitedata.dicom_warnings import count_kinds, log_kinds
from ..sitedata.ehr_source import ehr_source
from ..sitedata.imaging import task_for_site
from ..sitedata.join import duplicate_instances
from ..sitedata.pacs import PacsSyncReport
from ..sitedata.pacs_backend import is_dicom_uid
from ..sitedata.site_config import SiteConfig

logger = logging.getLogger(__name__)

#: column names that suggest direct identifiers in an EHR table
_IDENTIFYING = re.compile(
    r"(^|_)(name|surname|first_?name|last_?name|dob|birth|address|street|phone|"
    r"tel|email|ssn|social|zip|postcode|postal)($|_)",
    re.IGNORECASE,
)
#: modalities that often carry text burned into the pixels
_BURN_IN_PRONE = {"US", "SC", "XA", "OT", "ES", "SM", "DOC"}


def _counts(values: list[Any]) -> dict[str, int]:
    return dict(
        Counter("(none)" if v is None else str(v) for v in values).most_common()
    )


def _frac(num: int, den: int) -> float:
    return round(num / den, 4) if den else 0.0


def check_site(
    site_toml: Path,
    task: TaskConfig,
    *,
    image_size: int = 64,
    images_required: bool | None = None,
    run: RunConfig | None = None,
) -> dict[str, Any]:
    """Check a site; return a JSON-able report with ``can_train`` and ``blocking``.

    ``images_required`` is the run's :attr:`RunConfig.requires_images` (None: no
    run is known, as for the site daemon); only a site without imaging reads it.
    With ``run``, the site's privacy floor is checked against it as the site
    daemon would: a run the floor refuses is a blocking problem.
    Never raises for problems of the site's data or settings: they become
    ``blocking`` entries.
    """
    report: dict[str, Any] = {"config": str(site_toml), "blocking": [], "warnings": []}
    blocking, warnings = report["blocking"], report["warnings"]
    try:
        site = SiteConfig.from_toml(Path(site_toml))
        task = task_for_site(site, task, images_required)
    except WardroundError as exc:
        blocking.append(str(exc))
        report["exit_code"] = exc.exit_code  # 2: site.toml itself is to be fixed
        return _finish(report)
    report["sources"] = _sources(site)
    warnings.extend(_names_the_run_lacks(site, task))
    if not site.has_imaging:
        warnings.extend(_no_imaging_notes(site, images_required))
    missing = not_folders(site.dicom_paths)
    if missing:
        blocking.append(
            f"DICOM folder(s) not usable: {', '.join(missing)}; fix `data.dicom-dirs`"
        )
        return _finish(report)
    try:
        prep = prepare_site(site, task, image_size=image_size)
    except WardroundError as exc:
        blocking.append(str(exc))
        report["dicom"] = _dicom_section(site, _index_only(site), {}, {})
        return _finish(report)
    if prep.pacs is not None:
        report["pacs"] = _pacs_section(prep.pacs)
        warnings.extend(_pacs_warnings(prep.pacs))
    report["dicom"] = _dicom_section(site, prep.index, prep.images, prep.reasons)
    trained = {prep.ehr.study_uids[row] for row in prep.join.rows}
    report["dicom"]["decode_failures_of_trained_studies"] = sum(
        1 for study in prep.reasons if study in trained
    )
    report["ehr"] = _ehr_section(prep)
    report["ehr"]["not_recorded"] = [
        name
        for name in (*task.numeric, *task.categorical, *task.labels)
        if not site.ehr.records(name)
    ]
    for name in report["ehr"]["not_recorded"]:
        if name in report["ehr"]["label_prevalence"]:  # not 0.0: nothing is known
            report["ehr"]["label_prevalence"][name] = None
    report["join"] = _join_section(prep, task)
    split = _split(prep, site)
    if task.kind is TaskKind.CLASSIFICATION:  # the split AUROC is measured on
        report["validation"] = _validation_section(prep, split, task)
    report["fingerprint"] = prep.fingerprint
    report["phi"] = _phi_findings(prep, site)
    if task.kind is not TaskKind.CLASSIFICATION:
        report["text"] = _text_section(site, task, prep, blocking)
    blocking.extend(_join_blocking(report, site, task))
    if run is not None:
        in_validation, patient_ids = split
        train_patients = len(set(patient_ids[~in_validation]))
        blocking.extend(_privacy_floor_refusal(run, site, train_patients))
    warnings.extend(_not_recorded_notes(site, task))
    warnings.extend(_data_warnings(report))
    uses_notes = run is None or "note" in getattr(run.model, "modalities", ("note",))
    if task.kind is TaskKind.CLASSIFICATION and uses_notes:
        warnings.extend(_no_notes(report["join"], site.ehr.note))
    return _finish(report)


def _no_notes(join: dict[str, Any], note_column: str | None) -> list[str]:
    """A site whose note column is missing or empty trains its notes on nothing."""
    if not join.get("items") or join.get("items_with_note"):
        return []
    where = (
        f"the EHR's note column {note_column!r} is missing or empty in every row"
        if note_column
        else "site.toml declares no note column"
    )
    return [
        f"no study has a note: {where}, so the note modality learns nothing here. "
        'If the notes are in a column, set [ehr] note = "THAT_COLUMN" in site.toml'
    ]


def _names_the_run_lacks(site: SiteConfig, task: TaskConfig) -> list[str]:
    """Features and labels site.toml maps that the run does not have.

    A misspelling there leaves the intended mapping (its column, unit, range) unused.
    """
    found = []
    features = (*task.numeric, *task.categorical)
    for section, declared, known in (
        ("[ehr.features]", site.ehr.features, features),
        ("[ehr.labels]", site.ehr.labels, task.labels),
    ):
        for name in sorted(set(declared) - set(known)):
            found.append(
                f"{section} maps {name!r}, which this run does not have (it has: "
                f"{', '.join(known) or '-'}); it is not read. Check its spelling"
            )
    known = (*features, *task.labels)
    for name in sorted(set(site.ehr.not_recorded) - set(known)):
        found.append(
            f"[ehr] not-recorded names {name!r}, which this run does not have (its "
            f"features and labels: {', '.join(known) or '-'}). Check its spelling"
        )
    return found


def _not_recorded_notes(site: SiteConfig, task: TaskConfig) -> list[str]:
    """What site.toml says this site does not record, and what that means here."""
    features = [
        f for f in (*task.numeric, *task.categorical) if not site.ehr.records(f)
    ]
    labels = [x for x in task.labels if not site.ehr.records(x)]
    found = []
    if features:
        found.append(
            f"not recorded here ([ehr] not-recorded): feature(s) {', '.join(features)} "
            "count as missing in every row"
        )
    if labels:
        found.append(
            f"not recorded here ([ehr] not-recorded): label(s) {', '.join(labels)} "
            "count as unknown in every row: this site trains no loss on them and "
            "reports no AUROC for them"
        )
    return found


def _sources(site: SiteConfig) -> dict[str, str]:
    """Where the EHR and the images come from, as messages name them."""
    images = [str(p) for p in site.dicom_paths]
    if site.data.pacs is not None:
        images.append(site.data.pacs.describe())
    return {
        "ehr": ehr_source(site).label,
        "images": ", ".join(images) or "none (a site without imaging)",
    }


def _pacs_section(sync: PacsSyncReport) -> dict[str, Any]:
    """The PACS sync's counts, and the studies not complete counted by reason."""
    incomplete = [s for s in sync.studies if s.reason]
    return {
        **sync.totals(),
        "not_complete": dict(Counter(s.reason_kind for s in incomplete).most_common()),
        "seconds": round(sync.seconds, 1),
    }


def _pacs_warnings(sync: PacsSyncReport) -> list[str]:
    incomplete = [s for s in sync.studies if s.reason]
    if not incomplete:
        return []
    for outcome in incomplete:
        logger.warning(
            "PACS study %s: %s", _uid_shown(outcome.study_uid), outcome.reason
        )
    shown = "; ".join(f"{_uid_shown(s.study_uid)}: {s.reason}" for s in incomplete[:3])
    more = (
        f" (and {len(incomplete) - 3} more in the log)" if len(incomplete) > 3 else ""
    )
    return [
        f"{len(incomplete)} of {sync.requested} studies are not complete from "
        f"{sync.pacs}: {shown}{more}. What was fetched is kept; the next run "
        "fetches only the rest."
    ]


def _uid_shown(uid: str) -> str:
    # an EHR value that is not a UID may be anything (a name typed in the wrong column)
    return uid if is_dicom_uid(uid) else "(not a UID)"


def _index_only(site: SiteConfig) -> Any:
    """The DICOM index alone, for the report of a site whose data did not prepare."""
    from ..sitedata.dicom_index import INDEX_SCHEMA, index_dicom

    if site.has_imaging:
        return index_dicom(site.dicom_paths, site.cache_path)
    return INDEX_SCHEMA.empty_table()


def _join_blocking(
    report: dict[str, Any], site: SiteConfig, task: TaskConfig
) -> list[str]:
    """What in the join keeps the site from training: no items, one patient."""
    found: list[str] = []
    items = report["join"]["items"]
    if report["ehr"]["rows"] == 0:
        found.append(
            "the EHR table has no rows: check that data.ehr (or the database "
            "query) points at the export that holds the patients"
        )
    elif items == 0 and not site.has_imaging:
        found.append(
            "no EHR row has both a patient id and a study uid: check `[ehr] "
            "patient-id` and `[ehr] study-uid` in site.toml"
        )
    elif items == 0:
        found.append(
            "no EHR row joins a usable DICOM study: check `[ehr] study-uid` (the column "
            "holding StudyInstanceUID) and `data.dicom-dirs`"
            + ("" if task.require_image else ", or EHR rows lack patient id/study uid")
        )
    elif report["join"]["patients"] < 2:
        found.append("fewer than 2 patients: no validation split is possible")
    if items and report["join"]["items_with_image"] == 0 and task.require_image:
        found.append("no study image could be decoded (see dicom.decode_failures)")
    examples = report["ehr"]["label_examples"]
    if (
        task.kind is TaskKind.CLASSIFICATION
        and items
        and examples
        and not any(c["positive"] or c["negative"] for c in examples.values())
    ):
        # its loss would be zero while its studies still weigh in the average
        found.append(
            "no EHR row has a known value for any of the run's labels "
            f"({', '.join(examples)}), so this site has nothing to train on: map "
            "the label columns under [ehr.labels] (with positive/negative for text "
            "values); a site that records none of them cannot join this run"
        )
    return found


def _data_warnings(report: dict[str, Any]) -> list[str]:
    """What the site can train with but its operator should look at."""
    found: list[str] = []
    ehr = report["ehr"]
    declared = set(ehr.get("not_recorded", ()))  # said once, by _not_recorded_notes
    # counts, not the rounded prevalence: 1 positive in 20,001 rows rounds to 0.0
    for label, counts in ehr["label_examples"].items():
        if label in declared:
            continue
        if not counts["positive"] and not counts["negative"]:
            found.append(f"label {label!r} is unknown in every row at this site")
        elif not counts["positive"]:
            found.append(f"label {label!r} has no positive example at this site")
        elif not counts["negative"]:
            found.append(f"label {label!r} has no negative example at this site")
    for feature, frac in ehr["missing_fraction"].items():
        if frac >= 0.5 and feature not in declared:
            found.append(f"feature {feature!r} is missing in {frac:.0%} of rows")
    found.extend(_label_value_warnings(ehr, declared))
    found.extend(_validation_warnings(report, declared))
    found.extend(_feature_value_warnings(ehr))
    if ehr["rows_without_keys"]:
        found.append(
            f"{ehr['rows_without_keys']} EHR row(s) have no patient id or no study "
            "UID and are not used"
        )
    if ehr["duplicate_study_rows"]:
        found.append(
            f"{ehr['duplicate_study_rows']} EHR row(s) repeat another row's study UID: "
            "the first row of each study is used, the others are not"
        )
    if ehr.get("studies_with_conflicting_labels"):
        found.append(
            f"{ehr['studies_with_conflicting_labels']} of those stud(ies) have rows "
            "whose labels disagree, and the first row's are the ones trained on: "
            "check which row the export should keep"
        )
    join = report.get("join", {})
    unjoined = join.get("dicom_studies", 0) - join.get("dicom_studies_with_ehr", 0)
    if unjoined > 0:
        found.append(
            f"{unjoined} DICOM stud(ies) have no EHR row and are not used (the join "
            "is on the StudyInstanceUID and the EHR's study-uid column)"
        )
    found.extend(_permission_warnings(report["dicom"]))
    duplicates = report["dicom"]["duplicate_instances"]
    if duplicates:
        found.append(
            f"{duplicates} usable file(s) repeat the SOPInstanceUID of another (a "
            "re-send, a copy in another transfer syntax): each instance is used "
            "once, the first file read without warning, in path order"
        )
    warned = sum(report["dicom"]["pydicom_warnings"].values())
    if warned:
        found.append(
            f"pydicom warned {warned} time(s) reading the headers (by kind in "
            "dicom.pydicom_warnings; each file in the log)"
        )
    failures = sum(report["dicom"]["decode_failures"].values())
    trained = report["dicom"].get("decode_failures_of_trained_studies", failures)
    if trained:
        found.append(
            f"{trained} study image(s) could not be decoded (by reason in "
            "dicom.decode_failures); those studies train without image"
        )
    if failures > trained:
        found.append(
            f"{failures - trained} more study image(s) could not be decoded; their "
            "studies have no EHR row, so they would not train either way"
        )
    return found


def _permission_warnings(dicom: dict[str, Any]) -> list[str]:
    """Files and folders the account may not read: their images are not used."""
    not_usable = dicom.get("not_usable", {})
    failures = dicom.get("decode_failures", {})
    files = not_usable.get(NO_PERMISSION, 0) + failures.get(NO_PERMISSION, 0)
    folders = not_usable.get(FOLDER_NO_PERMISSION, 0)
    if not files and not folders:
        return []
    denied = [f"read {files} DICOM file(s)"] if files else []
    if folders:
        denied.append(f"list {folders} folder(s), whose files are unseen")
    return [
        f"the account running wardround ({_account()}) may not "
        + " and may not ".join(denied)
        + ": their images are not used. Give that account read access (e.g. "
        "through a group), then check again"
    ]


def _account() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _label_value_warnings(ehr: dict[str, Any], declared: set[str]) -> list[str]:
    """Label cells the site's table holds but training cannot use."""
    found = []
    for label, unusable in ehr["label_null"].items():
        if label in declared:
            continue
        unmapped = ehr["label_unmapped"].get(label, 0)
        if unmapped:
            found.append(
                f"label {label!r}: {unmapped} value(s) are neither 0/1 nor one of its "
                "declared positive/negative values (e.g. -1 for uncertain); they "
                "count as unknown and are left out of training and AUROC. Declare "
                "positive and negative for this label in site.toml's [ehr.labels], "
                "or recode the column"
            )
        if unusable - unmapped:
            found.append(
                f"label {label!r} is empty in {unusable - unmapped} row(s); they "
                "count as unknown and are left out of training and AUROC for this label"
            )
    return found


def _feature_value_warnings(ehr: dict[str, Any]) -> list[str]:
    """Feature values the encoding drops, when they are a large share of rows."""
    found = []
    rows = max(int(ehr["rows"]), 1)
    for feature, n in ehr["out_of_range"].items():
        if n / rows >= 0.1:
            found.append(
                f"feature {feature!r}: {n} of {rows} values are outside the run's "
                "plausible range and count as missing: check the column's unit and "
                "declare it (`unit`) in site.toml's [ehr.features]"
            )
    for feature, n in ehr["unknown_category"].items():
        if n:
            found.append(
                f"feature {feature!r}: {n} value(s) are none of the run's categories "
                "(matched exactly, after trimming spaces) and count as missing"
            )
    return found


def _no_imaging_notes(site: SiteConfig, images_required: bool | None) -> list[str]:
    notes = [
        "this site has no imaging (site.toml names no data.dicom-dirs): its studies "
        "train on EHR and notes"
        + (
            "; runs that require an image per study (task.require-image = true "
            "with images in model.modalities, or a vlm) are refused"
            if images_required is None
            else ""
        )
    ]
    beside = site.base_dir / "dicom"
    if beside.is_dir() and any(beside.iterdir()):
        notes.append(
            f"{beside} holds files but data.dicom-dirs does not name it: if those are "
            'the site\'s images, add `dicom-dirs = ["dicom"]` to [data]'
        )
    return notes


def _text_section(site: SiteConfig, task: TaskConfig, prep, blocking: list[str]):
    """The report / question / answer columns a generative (vlm) task trains on."""
    from ..sitedata.vlm_dataset import read_text_columns

    try:
        texts = read_text_columns(site, task.kind)
    except WardroundError as exc:
        blocking.append(str(exc))
        return {"kind": task.kind.value, "studies_with_target": 0}
    joined = list(prep.images)
    with_target = sum(1 for study in joined if texts.target.get(study))
    section: dict[str, Any] = {
        "kind": task.kind.value,
        "studies_with_target": with_target,
        "studies_without_target": len(joined) - with_target,
    }
    if task.kind is TaskKind.VQA:
        section["studies_with_question"] = sum(
            1 for study in joined if texts.question.get(study)
        )
    if joined and with_target == 0:
        target = "report" if task.kind is TaskKind.REPORT else "answer"
        blocking.append(
            f"no joined study has a {target} text: fill the column "
            f"`[ehr] {target}` names ({getattr(site.ehr, target)!r})"
        )
    return section


def _finish(report: dict[str, Any]) -> dict[str, Any]:
    report["can_train"] = not report["blocking"]
    return report


def _dicom_section(
    site: SiteConfig, index, images, reasons: dict[str, str]
) -> dict[str, Any]:
    status = index.column("status").to_pylist()
    usable = index.filter(pc.equal(index.column("status"), OK))
    syntaxes = [
        transfer_syntax_name(t) for t in index.column("transfer_syntax").to_pylist()
    ]
    per_file = index.column("warnings").to_pylist()
    for path, kinds in zip(index.column("path").to_pylist(), per_file, strict=True):
        log_kinds(path, kinds or ())
    return {
        "folders": len(site.data.dicom_dirs),
        # a folder the account cannot list has a row of its own: not a file
        "files": index.num_rows - status.count(FOLDER_NO_PERMISSION),
        "usable_files": usable.num_rows,
        "studies": len(images),
        "by_modality": _counts(usable.column("modality").to_pylist()),
        "by_body_part": _counts(usable.column("body_part").to_pylist()),
        "by_transfer_syntax": _counts(syntaxes),
        "multi_frame_files": int(
            pc.sum(pc.greater(usable.column("frames"), 1)).as_py() or 0
        ),
        "not_usable": _counts([s for s in status if s != OK]),
        "decode_failures": _counts(list(reasons.values())),
        "duplicate_instances": duplicate_instances(index),
        "pydicom_warnings": count_kinds(per_file),
    }


def _ehr_section(prep) -> dict[str, Any]:
    stats = prep.ehr.stats
    rows = stats.rows
    labelled = {k: rows - stats.label_null.get(k, 0) for k in stats.label_positive}
    return {
        "rows": rows,
        "studies": prep.join.ehr_studies,
        "duplicate_study_rows": prep.join.duplicates,
        "studies_with_conflicting_labels": prep.join.conflicting,
        "rows_without_keys": prep.join.no_key,
        "missing_fraction": {k: _frac(v, rows) for k, v in stats.missing.items()},
        "out_of_range": dict(stats.out_of_range),
        "unknown_category": dict(stats.unknown_category),
        "label_prevalence": {
            k: _frac(v, labelled[k]) for k, v in stats.label_positive.items()
        },
        "label_examples": {
            k: {"positive": int(v), "negative": int(labelled[k] - v)}
            for k, v in stats.label_positive.items()
        },
        "label_null": dict(stats.label_null),
        "label_unmapped": dict(stats.label_unmapped),
        # only where a unit column gives each row's unit (e.g. OMOP)
        **({"unit_unknown": dict(stats.unit_unknown)} if stats.unit_unknown else {}),
    }


def _privacy_floor_refusal(
    run: RunConfig, site: SiteConfig, train_patients: int
) -> list[str]:
    """The site's [privacy] floor's refusal of ``run``, as the daemon would say it."""
    from .privacy_policy import plan_site_privacy

    if train_patients < 1:
        return []  # no training split: blocked as such
    try:
        plan_site_privacy(run, site.privacy, train_patients, simulation=False)
    except PrivacyPolicyRefused as exc:
        return [f"{exc.message} ({exc.hint})" if exc.hint else exc.message]
    return []


def _split(prep, site: SiteConfig) -> tuple[np.ndarray, np.ndarray]:
    """Which joined rows training puts in validation, and their patient ids."""
    patient_ids = [prep.ehr.patient_ids[i] or "" for i in prep.join.rows]
    in_validation = split_patients(
        patient_ids, site.data.split_seed, site.data.validation_fraction
    )
    return in_validation, np.asarray(patient_ids, dtype=object)


def _validation_section(
    prep, split: tuple[np.ndarray, np.ndarray], task: TaskConfig
) -> dict[str, Any]:
    """The validation split training will use: its size and each label's classes."""
    in_val, ids = split
    val_rows = np.asarray(prep.join.rows, dtype=np.int64)[in_val]
    labels = prep.ehr.labels[val_rows]
    known = ~prep.ehr.label_null[val_rows]
    return {
        "patients": len(set(ids[in_val])),
        "train_patients": len(set(ids[~in_val])),
        "items": int(in_val.sum()),
        "labels": {
            name: {
                "positive": int(((labels[:, k] > 0.5) & known[:, k]).sum()),
                "negative": int(((labels[:, k] < 0.5) & known[:, k]).sum()),
            }
            for k, name in enumerate(task.labels)
        },
    }


def _validation_warnings(report: dict[str, Any], declared: set[str]) -> list[str]:
    """Labels whose AUROC this site's validation split cannot measure."""
    validation = report.get("validation")
    if not validation or not validation["items"]:
        return []
    found = []
    at_site = report["ehr"]["label_examples"]
    train_patients = validation["train_patients"]
    if train_patients < validation["patients"]:
        found.append(
            f"the training split holds {train_patients} patient(s) and the "
            f"validation split {validation['patients']}: check "
            "data.validation-fraction (0.2 by default)"
        )
    for label, counts in validation["labels"].items():
        if label in declared:
            continue
        if label in at_site and not all(at_site[label].values()):
            continue  # one class (or none) at the whole site: warned as such
        if not counts["positive"] or not counts["negative"]:
            found.append(
                f"label {label!r}: the validation split ({validation['patients']} "
                f"patient(s)) holds {counts['positive']} positive and "
                f"{counts['negative']} negative example(s), so this site's AUROC "
                "for it is undefined and its macro AUROC leaves it out; more "
                "patients, or a larger data.validation-fraction, fix it"
            )
    return found


def _join_section(prep, task: TaskConfig) -> dict[str, Any]:
    join, ehr = prep.join, prep.ehr
    position = {s: j for j, s in enumerate(prep.images)}
    with_image = 0
    for i in join.rows:
        j = position.get(ehr.study_uids[i])
        if j is not None and not np.isnan(prep.decoded[j]).any():
            with_image += 1
    present_ehr: np.ndarray | list[bool] = (
        ehr_present(ehr.features[join.rows], task) if join.rows else []
    )
    studies_per_patient = Counter(ehr.patient_ids[i] for i in join.rows)
    return {
        "ehr_studies_with_image": join.ehr_with_image,
        "ehr_studies": join.ehr_studies,
        "dicom_studies_with_ehr": join.dicom_with_ehr,
        "dicom_studies": join.dicom_studies,
        "ehr_coverage": _frac(join.ehr_with_image, join.ehr_studies),
        "dicom_coverage": _frac(join.dicom_with_ehr, join.dicom_studies),
        "require_image": task.require_image,
        "items": len(join.rows),
        "items_with_image": with_image,
        "items_with_ehr": int(np.sum(present_ehr)),
        "items_with_note": sum(1 for i in join.rows if ehr.notes[i].strip()),
        "patients": len(studies_per_patient),
        # DP-SGD samples patients and takes one study of each: epsilon is per patient
        "max_studies_per_patient": max(studies_per_patient.values(), default=0),
    }


def _phi_findings(prep, site: SiteConfig) -> list[str]:
    found = []
    usable = prep.index.filter(pc.equal(prep.index.column("status"), OK))
    removed = usable.column("identity_removed").to_pylist()
    not_deid = sum(1 for r in removed if r is not True)
    if not_deid:
        found.append(
            f"{not_deid} image file(s) are not marked de-identified "
            "(PatientIdentityRemoved is not YES). They never leave the site; use "
            "`wardround site deid` for copies you share."
        )
    burned = sum(1 for b in usable.column("burned_in").to_pylist() if b is True)
    if burned:
        found.append(
            f"{burned} image file(s) declare burned-in annotation (text in "
            "the pixels): review them before sharing any copy."
        )
    prone = sum(
        1
        for m, b in zip(
            usable.column("modality").to_pylist(),
            usable.column("burned_in").to_pylist(),
            strict=True,
        )
        if b is None and (m or "").upper() in _BURN_IN_PRONE
    )
    if prone:
        found.append(
            f"{prone} image file(s) of modalities that often carry burned-in "
            "text do not declare BurnedInAnnotation."
        )
    columns = ehr_source(site).arrow_schema().names
    risky = [c for c in columns if _IDENTIFYING.search(c)]
    if risky:
        found.append(
            f"the EHR table has {len(risky)} column(s) whose names suggest identifiers "
            f"({', '.join(risky)}); wardround never reads undeclared columns."
        )
    if site.ehr.note and any(t for t in prep.ehr.notes):
        found.append(
            "free-text notes may hold names or dates; they are tokenised on "
            "the site and never sent."
        )
    return found


_IMAGE_JOIN_KEYS = {
    "ehr_studies_with_image",
    "dicom_studies_with_ehr",
    "dicom_studies",
    "ehr_coverage",
    "dicom_coverage",
    "items_with_image",
}


def format_report(report: dict[str, Any]) -> str:
    """Plain-text rendering of a report, for a terminal."""
    lines = [f"site check: {report['config']}"]
    for key, value in report.get("sources", {}).items():
        lines.append(f"{key} from: {value}")
    imaging = "pacs" in report or report.get("dicom", {}).get("folders", 1) > 0
    for section in ("pacs", "dicom", "ehr", "join", "validation", "text"):
        if section not in report:
            continue
        lines.append(f"[{section}]")
        if section == "dicom" and not imaging:
            lines.append("  none: this site has no imaging (no dicom-dirs, no PACS)")
            continue
        for key, value in report[section].items():
            if section == "join" and not imaging and key in _IMAGE_JOIN_KEYS:
                continue  # a site without imaging joins nothing: zeros say nothing
            if section == "validation" and key == "labels":
                lines.append(
                    "  labels (positive/negative): "
                    + ", ".join(
                        f"{k}: {v['positive']}/{v['negative']}"
                        for k, v in value.items()
                    )
                )
            elif isinstance(value, dict):
                shown = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
                lines.append(f"  {key}: {shown}")
            else:
                lines.append(f"  {key}: {value}")
    if "fingerprint" in report:
        lines.append(f"dataset fingerprint: {report['fingerprint']}")
    if report.get("log") and report.get("dicom", {}).get("pydicom_warnings"):
        lines.append(f"pydicom's warnings, file by file: {report['log']}")
    for title, key in (
        ("PHI risk", "phi"),
        ("warning", "warnings"),
        ("BLOCKING", "blocking"),
    ):
        for item in report.get(key, []):
            lines.append(f"{title}: {item}")
    lines.append(
        "result: "
        + (
            "the site can train"
            if report["can_train"]
            else f"{len(report['blocking'])} blocking problem(s)"
        )
    )
    return "\n".join(lines)
