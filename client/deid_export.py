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
- **failed**, with its reason (not DICOM, unreadable, not writable after
  de-identification).

``written + duplicates + failed`` is the number of input files. Folders the
account running wardround may not list are named apart (their files are unseen). Nothing in
``--out`` is overwritten silently: a copy already there from an earlier export is
counted as replaced. The per-file account goes to a JSON Lines report that names
source paths, so it is kept beside ``--out``, never inside it.
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

from ..common.errors import ConfigError, DataError
from ..sitedata import dicom_warnings
from ..sitedata.decode import OK, DecodeFailure, read_dataset
from ..sitedata.dicom_index import read_header
from .deid import deidentify

logger = logging.getLogger(__name__)

WRITTEN, DUPLICATE, FAILED = "written", "duplicate", "failed"
NOT_WRITABLE = "could not be written after de-identification"
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
    replaced: bool = False  # written over a copy an earlier export left in --out
    warnings: list[str] = field(default_factory=list)  # kinds of pydicom's warnings


@dataclass
class DeidResult:
    """What an export did (counts and fixed-vocabulary reasons only)."""

    files: int = 0
    written: int = 0
    duplicates: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    replaced: int = 0
    burned_in: int = 0
    burn_in_undeclared: int = 0
    ehr_rows: int = 0
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
    paths = sorted(p for p in src.rglob("*") if p.is_file())
    result = DeidResult(files=len(paths), report=str(report))
    result.unlisted_folders = unlisted_folders(src)
    outcomes: dict[Path, FileOutcome] = {}
    instances: dict[str, list[tuple[tuple[bool, bool], Path]]] = {}
    for path in paths:
        row = read_header(path)  # pydicom's warnings in row["warnings"]
        outcomes[path] = FileOutcome(
            source=str(path.relative_to(src)),
            status=FAILED,
            warnings=list(row["warnings"] or []),
        )
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
            elif _export(path, src, dst, salt, outcomes[path], taken, result):
                kept = path
    result.outcomes = [outcomes[p] for p in paths]
    failed: Counter[str] = Counter()
    for o in result.outcomes:
        result.written += o.status == WRITTEN
        result.duplicates += o.status == DUPLICATE
        result.replaced += o.replaced
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
    result: DeidResult,
) -> bool:
    """De-identify and write one file; record the outcome; True when written."""
    with dicom_warnings.capture() as kinds:
        written = _write_copy(path, src, dst, salt, outcome, taken, result)
    outcome.warnings += kinds  # filled as the capture ends
    return written


def _write_copy(path, src, dst, salt, outcome, taken, result) -> bool:  # noqa: ANN001
    try:
        ds = read_dataset(path)
    except DecodeFailure as exc:
        outcome.reason = exc.reason
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
    existed = out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(out, enforce_file_format="TransferSyntaxUID" in ds.file_meta)
    except Exception:  # noqa: BLE001 - a file that cannot be written is counted
        outcome.reason = NOT_WRITABLE
        out.unlink(missing_ok=True)
        return False
    taken.add(out)
    outcome.status, outcome.output = WRITTEN, str(out.relative_to(dst))
    outcome.replaced = existed
    result.burned_in += burned == "YES"
    result.burn_in_undeclared += prone
    return True


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
