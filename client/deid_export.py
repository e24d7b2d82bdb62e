"""``wardround site deid``: the folder walk, and an account of every input file.

Each input file ends as exactly one of:

- **written**: its de-identified copy is ``<study>/<series>/<sop>.dcm`` in
  ``--out``, named by pseudonym (source paths may hold names);
- **duplicate**: another file has the same SOPInstanceUID (a re-send, a copy in
  another transfer syntax) and was written instead. The rule: of the files of one
  instance, the one written is the first of them ranked by (1) a header the DICOM
  index calls usable (an image with all its pixel data, in a transfer syntax this
  machine decodes), (2) a header pydicom reads without warning, (3) source path
  order. A file that fails is followed by the next of its instance;
- **failed**, with its reason (not DICOM, unreadable, a media directory
  (DICOMDIR: its records name patients and source folders), no SOP Class/Instance
  UID for the file meta, not writable after de-identification).

``written + duplicates + failed`` is the number of input files. Folders the
account running wardround may not list are named apart (their files are unseen).
``--out`` must be new or empty: an earlier export's copies (under another salt's
pseudonyms, or of files since deleted) would otherwise stay beside this one's. A
written file that declares burned-in text, or is of a modality prone to it
without declaring, is marked in its line. The per-file account goes to a JSON
Lines report that names source paths, so it is kept beside ``--out``, never
inside it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom.uid import MediaStorageDirectoryStorage

from ..common.errors import ConfigError, DataError
from ..sitedata import dicom_warnings
from ..sitedata.decode import (
    BROKEN_LINK,
    OK,
    TRUNCATED,
    UNREADABLE,
    DecodeFailure,
    read_dataset,
)
from ..sitedata.dicom_index import read_header, walk_files
from .deid import deidentify

logger = logging.getLogger(__name__)

WRITTEN, DUPLICATE, FAILED = "written", "duplicate", "failed"
NOT_WRITABLE = "could not be written after de-identification"
NO_META_UIDS = "no SOPClassUID / SOPInstanceUID for the file meta"
MEDIA_DIRECTORY = "media directory, not an instance"
NOT_EXPORTED = frozenset({UNREADABLE, TRUNCATED, BROKEN_LINK})
"""Index statuses of files not copied: a whole-looking copy of a file cut short
(pydicom reads a header that ends early without a word) would hide the damage."""
BURNED_IN_DECLARED, BURN_IN_UNDECLARED = "declared", "undeclared-risk"
NAME_TAKEN = "its pseudonymised name is another file's"
_BURN_IN_PRONE = {"US", "SC", "XA", "OT", "ES", "SM", "DOC"}


@dataclass
class FileOutcome:
    """What became of one input file (a line of the report)."""

    source: str  # relative to --in
    status: str  # written, duplicate or failed
    output: str | None = None  # written: relative to --out
    duplicate_of: str | None = None  # duplicate: the source written for its instance
    reason: str | None = None  # failed: why
    # written, to review for text in the pixels: "declared" (BurnedInAnnotation YES)
    # or "undeclared-risk" (not declared, in a modality prone to it)
    burned_in: str | None = None
    warnings: list[str] = field(default_factory=list)  # kinds of pydicom's warnings


@dataclass
class DeidResult:
    """What an export did (counts and fixed-vocabulary reasons only)."""

    files: int = 0
    written: int = 0
    duplicates: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    burned_in: int = 0
    burn_in_undeclared: int = 0
    ehr_rows: int = 0
    ehr_missing_ids: dict[str, int] = field(default_factory=dict)
    """Per EHR id column, rows with no id (null, empty or spaces): left null."""
    pydicom_warnings: dict[str, int] = field(default_factory=dict)
    unlisted_folders: list[str] = field(default_factory=list)
    """Folders under --in (relative) the account may not list: their files are unseen."""
    report: str = ""
    outcomes: list[FileOutcome] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        """The counts, JSON-able (no per-file lines)."""
        out = asdict(self)
        del out["outcomes"]
        return out


def default_report(dst: Path) -> Path:
    """``<out>.deid-report.jsonl`` beside the output folder."""
    dst = Path(dst)
    return dst.parent / f"{dst.name}.deid-report.jsonl"


def deid_folder(
    src: Path, dst: Path, salt: bytes, *, report: Path | None = None
) -> DeidResult:
    """Write a de-identified copy of every DICOM file under ``src`` into ``dst``.

    Accounts for every file (module docstring) and writes the per-file report to
    ``report`` (default :func:`default_report`).
    """
    src, dst = Path(src), Path(dst)
    report = Path(report) if report is not None else default_report(dst)
    if not src.is_dir():
        raise DataError(f"DICOM folder {src} not found", hint="Check --in.")
    if _inside(dst, src):
        raise ConfigError("--out must be outside --in", hint="Choose another folder.")
    if _inside(report, dst) or _inside(report, src):
        raise ConfigError(
            f"the report {report} names source files: keep it outside --in and --out",
            hint="Give --report a path beside them.",
        )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(
            f"--out {dst} is not an empty folder: an earlier export's copies would "
            "stay beside this one's (under other pseudonyms, or of deleted files)",
            hint="Choose a new or empty folder for --out, or remove this one.",
        )
    paths = sorted(walk_files(src))  # the index's walk: the files site check sees
    result = DeidResult(files=len(paths), report=str(report))
    result.unlisted_folders = unlisted_folders(src)
    outcomes: dict[Path, FileOutcome] = {}
    statuses: dict[Path, str] = {}
    instances: dict[str, list[tuple[tuple[bool, bool], Path]]] = {}
    for path in paths:
        row = read_header(path)  # pydicom's warnings in row["warnings"]
        outcomes[path] = FileOutcome(
            source=str(path.relative_to(src)),
            status=FAILED,
            warnings=_once(row["warnings"] or []),
        )
        statuses[path] = row["status"]
        key = row["sop_uid"] or f"\x00{path}"  # no instance UID: its own instance
        rank = (row["status"] != OK, bool(row["warnings"]))
        instances.setdefault(key, []).append((rank, path))
    taken: set[Path] = set()
    for files in instances.values():
        kept: Path | None = None
        for _, path in sorted(files):
            if kept is not None:
                outcomes[path].status = DUPLICATE
                outcomes[path].duplicate_of = outcomes[kept].source
            elif statuses[path] in NOT_EXPORTED:
                outcomes[path].reason = statuses[path]
            elif _export(path, src, dst, salt, outcomes[path], taken):
                kept = path
    result.outcomes = [outcomes[p] for p in paths]
    failed: Counter[str] = Counter()
    for o in result.outcomes:
        result.written += o.status == WRITTEN
        result.duplicates += o.status == DUPLICATE
        result.burned_in += o.burned_in == BURNED_IN_DECLARED
        result.burn_in_undeclared += o.burned_in == BURN_IN_UNDECLARED
        if o.status == FAILED:
            failed[o.reason or "unknown"] += 1
        dicom_warnings.log_kinds(o.source, o.warnings)
    result.failed = dict(failed.most_common())
    result.pydicom_warnings = dicom_warnings.count_kinds(
        o.warnings for o in result.outcomes
    )
    assert result.written + result.duplicates + sum(failed.values()) == result.files
    _write_report(report, result.outcomes)
    logger.info(
        "de-identified %d of %d file(s): %d duplicate, %d failed",
        result.written,
        result.files,
        result.duplicates,
        sum(failed.values()),
    )
    return result


def unlisted_folders(src: Path) -> list[str]:
    """Folders under ``src`` that this account may not list, relative to ``src``.

    A folder walk skips them without a word; the export names them instead.
    """
    denied: list[str] = []

    def note(error: OSError) -> None:
        if isinstance(error, PermissionError) and error.filename:
            denied.append(str(Path(error.filename).relative_to(src)) or ".")

    for _ in os.walk(src, onerror=note):
        pass
    return sorted(denied)


def _export(
    path: Path,
    src: Path,
    dst: Path,
    salt: bytes,
    outcome: FileOutcome,
    taken: set[Path],
) -> bool:
    """De-identify and write one file; record the outcome; True when written."""
    with dicom_warnings.capture() as kinds:
        written = _write_copy(path, src, dst, salt, outcome, taken)
    # the header read and this full read report the same problems: once per file
    outcome.warnings = _once(outcome.warnings + kinds)  # kinds: filled as capture ends
    return written


def _once(kinds: list[str]) -> list[str]:
    """Each kind of warning once, in first-seen order."""
    return list(dict.fromkeys(kinds))


def _write_copy(path, src, dst, salt, outcome, taken) -> bool:  # noqa: ANN001
    try:
        ds = read_dataset(path)
    except DecodeFailure as exc:
        outcome.reason = exc.reason
        return False
    meta = getattr(ds, "file_meta", None) or {}
    if (
        meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage
        or "DirectoryRecordSequence" in ds
    ):
        outcome.reason = MEDIA_DIRECTORY
        return False
    burned = str(ds.get("BurnedInAnnotation", "")).upper()
    prone = not burned and str(ds.get("Modality", "")).upper() in _BURN_IN_PRONE
    deidentify(ds, salt)
    study, series, sop = (
        str(ds.get(k, "") or "")
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    if not sop:  # named by a salted hash of its source path: unique, not its name
        digest = hmac.new(salt, str(path.relative_to(src)).encode(), hashlib.sha256)
        sop = "no-sop-uid-" + digest.hexdigest()[:24]
    out = dst / (study or "no-study-uid") / (series or "no-series-uid") / f"{sop}.dcm"
    if out in taken:
        outcome.reason = NAME_TAKEN
        return False
    as_file_format = "TransferSyntaxUID" in ds.file_meta
    if as_file_format and not _meta_uids(ds):
        outcome.reason = NO_META_UIDS
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(out, enforce_file_format=as_file_format)
    except OSError as exc:  # the system's words (no space, ...), never header text
        outcome.reason = f"{NOT_WRITABLE}: {exc.strerror or type(exc).__name__}"
        out.unlink(missing_ok=True)
        return False
    except Exception:  # noqa: BLE001 - a file that cannot be written is counted
        outcome.reason = NOT_WRITABLE
        out.unlink(missing_ok=True)
        return False
    taken.add(out)
    outcome.status, outcome.output = WRITTEN, str(out.relative_to(dst))
    if burned == "YES":
        outcome.burned_in = BURNED_IN_DECLARED
    elif prone:
        outcome.burned_in = BURN_IN_UNDECLARED
    return True


def _meta_uids(ds) -> bool:  # noqa: ANN001
    """Whether the file meta gets its SOP Class and Instance UIDs.

    pydicom copies them from the dataset, or keeps the meta's own.
    """
    meta = ds.file_meta
    return all(
        str(ds.get(own, "") or meta.get(in_meta, "") or "").strip()
        for own, in_meta in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        )
    )


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _write_report(report: Path, outcomes: list[FileOutcome]) -> None:
    report.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.with_name(report.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for o in outcomes:
            line = {k: v for k, v in asdict(o).items() if v not in (None, False, [])}
            handle.write(json.dumps(line) + "\n")
    tmp.replace(report)
