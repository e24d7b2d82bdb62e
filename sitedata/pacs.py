"""Fetch the studies a site needs from its PACS into the site's cache, incrementally.

The EHR names the studies (StudyInstanceUIDs); the PACS lists each study's instances
(QIDO-RS or C-FIND) and the ones not yet cached are fetched (WADO-RS, or C-GET /
C-MOVE) into ``<cache-dir>/pacs/<study>/<series>/<sop>.dcm``, which
:func:`.dicom_index.index_dicom` then indexes like any DICOM folder. The files are
the cache's manifest: an instance whose file exists is not fetched again, so the
next sync fetches only what is new, and an interrupted sync keeps what it got. The
cache follows the PACS's answers: a cached file of a study that the PACS no longer
lists is deleted, and so is a study it answers not-found (deleted or withdrawn
there); a PACS that does not answer deletes nothing. Each
file is written under ``<cache-dir>/pacs-incoming`` first, its header checked
against the instance asked for, then moved into place (``os.replace``), so a
half-written file is never in the folder that is indexed.

UIDs from the PACS become folder and file names only if they are DICOM UIDs (digits
and dots): a PACS cannot make wardround write outside the cache. The PACS is only
read (:mod:`.pacs_backend`). Every study asked for ends in exactly one
:class:`StudyStatus`, with a reason from :data:`REASONS` unless it is complete.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from ..common.errors import SourceUnreachable
from .pacs_backend import (
    FailureKind,
    InstanceRef,
    PacsBackend,
    PacsRequestError,
    Payload,
    is_dicom_uid,
)
from .pacs_config import PacsProtocol, PacsSection
from .secrets import read_secret

logger = logging.getLogger(__name__)

PACS_FOLDER = "pacs"  # under the site's cache folder: what index_dicom reads
INCOMING_FOLDER = "pacs-incoming"  # beside it, never indexed: files being checked
REMOVED_FOLDER = "pacs-removed"
"""Beside ``<cache-dir>/pacs``: cached files the PACS no longer lists, kept aside."""

REASONS = (
    "not-found",  # the PACS lists no instance of the study
    "partial",  # fewer instances cached than the PACS listed; the cause follows
    "refused",  # the PACS answered with an error (HTTP status, DIMSE status, AE)
    "timeout",  # the PACS did not answer within timeout-s
    "interrupted",  # an answer broke off midway
    "unreachable",  # no connection to the PACS
    "invalid-uid",  # a UID (asked for, or from the PACS) that is not a DICOM UID
    "invalid-instance",  # the PACS sent something other than the instance asked
)
"""The first word of every reason a study is not complete."""
TIMEOUTS_IN_A_ROW = 3  # after this many, the PACS is taken to be down for this sync
_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


class StudyStatus(StrEnum):
    """Where a study stands after a sync."""

    CACHED = "cached"  # complete; nothing needed fetching
    FETCHED = "fetched"  # complete; this sync fetched some or all of it
    PARTIAL = "partial"  # listed, but fewer instances cached than listed
    FAILED = "failed"  # not listed: not on the PACS, or the query failed


@dataclass(frozen=True)
class PacsStudyOutcome:
    """One study's sync: instances listed, already cached, fetched now, and why not."""

    study_uid: str
    status: StudyStatus
    expected: int = 0  # instances the PACS listed
    cached: int = 0  # of those, already in the cache before this sync
    fetched: int = 0  # of those, fetched by this sync
    bytes_fetched: int = 0
    reason: str | None = None  # None when complete; else starts with one of REASONS
    removed: int = 0  # cached files taken out: the PACS no longer lists them

    @property
    def reason_kind(self) -> str | None:
        """The reason's first word (one of :data:`REASONS`), None when complete."""
        return self.reason.split(":", 1)[0] if self.reason else None


@dataclass(frozen=True)
class PacsSyncReport:
    """A sync's outcome per study (sorted by UID) and its totals."""

    pacs: str  # the PACS as messages name it
    folder: Path  # <cache-dir>/pacs: the folder to index
    studies: tuple[PacsStudyOutcome, ...]
    seconds: float

    def count(self, status: StudyStatus) -> int:
        """Studies that ended in ``status``."""
        return sum(1 for s in self.studies if s.status is status)

    @property
    def requested(self) -> int:
        """Distinct studies asked for."""
        return len(self.studies)

    @property
    def instances_fetched(self) -> int:
        """Instances this sync wrote into the cache."""
        return sum(s.fetched for s in self.studies)

    @property
    def bytes_fetched(self) -> int:
        """Bytes this sync wrote into the cache."""
        return sum(s.bytes_fetched for s in self.studies)

    def totals(self) -> dict[str, int]:
        """Counts for a report or JSON: studies by status, instances and bytes."""
        return {
            "requested": self.requested,
            **{status.value: self.count(status) for status in StudyStatus},
            "instances_expected": sum(s.expected for s in self.studies),
            "instances_cached": sum(s.cached for s in self.studies),
            "instances_fetched": self.instances_fetched,
            "bytes_fetched": self.bytes_fetched,
            # deleted or corrected on the PACS since they were cached
            "instances_removed": sum(s.removed for s in self.studies),
            "studies_removed": sum(
                1 for s in self.studies if s.removed and s.reason_kind == "not-found"
            ),
        }


def sync_pacs(
    section: PacsSection, base_dir: Path, study_uids: Iterable[str], cache_dir: Path
) -> PacsSyncReport:
    """Fetch the instances of ``study_uids`` not yet under ``cache_dir/pacs``.

    Parameters
    ----------
    section
        The site's ``[data.pacs]``.
    base_dir
        The folder of ``site.toml`` (relative ``password-file`` and ``ca-file``).
    study_uids
        The studies to have, e.g. the EHR's study UIDs; repeats count once.
    cache_dir
        The site's cache folder; instances go to ``cache_dir/pacs``.

    Raises
    ------
    SourceUnreachable
        The PACS does not answer or refuses us, before any study is asked for.
        Failures after that are reported per study, never raised.
    ConfigError
        The password file or variable cannot be read.
    """
    started = time.monotonic()
    root = Path(cache_dir) / PACS_FOLDER
    incoming = Path(cache_dir) / INCOMING_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    incoming.mkdir(parents=True, exist_ok=True)
    _clear(incoming)  # leftovers of an interrupted sync
    backend = open_backend(section, base_dir, incoming)
    outcomes: list[PacsStudyOutcome] = []
    try:
        _echo(backend, section)
        skip_reason: str | None = None  # once the PACS is gone, the rest are not tried
        timeouts = 0
        for study_uid in sorted(set(study_uids)):
            if skip_reason is not None:
                outcomes.append(_failed(study_uid, skip_reason))
                continue
            outcome, error = _sync_study(backend, section, root, incoming, study_uid)
            outcomes.append(outcome)
            _log_study(outcome)
            # transient failures: the PACS is taken to be gone after a few in a row
            timeouts = (
                timeouts + 1
                if error
                and error.kind in (FailureKind.TIMEOUT, FailureKind.INTERRUPTED)
                else 0
            )
            skip_reason = _give_up(error, timeouts)
    finally:
        backend.close()
        _clear(incoming)
    report = PacsSyncReport(
        pacs=section.describe(),
        folder=root,
        studies=tuple(outcomes),
        seconds=time.monotonic() - started,
    )
    totals = report.totals()
    logger.info(
        "PACS sync from %s: %d studies requested, %d cached, %d fetched, "
        "%d partial, %d failed; %d instances (%.1f MB) fetched in %.1f s; "
        "%d cached instances removed (%d studies no longer on the PACS)",
        report.pacs,
        totals["requested"],
        totals["cached"],
        totals["fetched"],
        totals["partial"],
        totals["failed"],
        totals["instances_fetched"],
        totals["bytes_fetched"] / 1e6,
        report.seconds,
        totals["instances_removed"],
        totals["studies_removed"],
    )
    return report


def check_pacs_reachable(section: PacsSection, base_dir: Path) -> None:
    """Check that the PACS answers and accepts us (QIDO-RS search, or C-ECHO).

    Raises
    ------
    SourceUnreachable
        Naming the PACS and why: connection refused, timeout, credentials refused
        (never the password), association rejected.
    ConfigError
        The password file or variable cannot be read.
    """
    backend = open_backend(section, base_dir, None)
    try:
        _echo(backend, section)
    finally:
        backend.close()


def open_backend(
    section: PacsSection, base_dir: Path, incoming: Path | None
) -> PacsBackend:
    """The back-end for ``section.protocol`` (``incoming``: where DIMSE receives)."""
    if section.protocol is PacsProtocol.DICOMWEB:
        from .pacs_dicomweb import DicomWebBackend

        password = read_secret(section, base_dir, "[data.pacs]")
        return DicomWebBackend(section, password, base_dir)
    from .pacs_dimse import DimseBackend

    return DimseBackend(section, incoming)


def cached_path(root: Path, study_uid: str, ref: InstanceRef) -> Path:
    """Where an instance is cached: ``root/<study>/<series>/<sop>.dcm``.

    Raises ValueError unless every part is a DICOM UID (so the path stays in root).
    """
    for uid in (study_uid, ref.series_uid, ref.sop_uid):
        if not is_dicom_uid(uid):
            raise ValueError("not a DICOM UID; it cannot name a file in the cache")
    path = root / study_uid / ref.series_uid / f"{ref.sop_uid}.dcm"
    if os.path.normpath(path).startswith(os.path.normpath(root) + os.sep):
        return path
    raise ValueError("a cache path must stay in the cache folder")  # pragma: no cover


def _sync_study(
    backend: PacsBackend,
    section: PacsSection,
    root: Path,
    incoming: Path,
    study_uid: str,
) -> tuple[PacsStudyOutcome, PacsRequestError | None]:
    if not is_dicom_uid(study_uid):
        reason = "invalid-uid: the study UID asked for is not a DICOM UID"
        return _failed(study_uid, reason), None
    try:
        listed = backend.find_instances(study_uid)
    except PacsRequestError as err:
        return _failed(study_uid, _reason(err)), err
    if not listed:
        # The PACS answered: a study deleted there (withdrawn consent, a mis-filed
        # study) leaves the cache too, so it no longer trains.
        removed = _remove_unlisted(root, study_uid, set())
        reason = "not-found: the PACS lists no instance of it" + (
            f"; its {removed} cached file(s) were removed (kept aside in "
            f"{REMOVED_FOLDER})"
            if removed
            else ""
        )
        return _failed(study_uid, reason, removed), None
    if len(listed) > section.max_instances_per_study:
        reason = (
            f"refused: the PACS lists {len(listed)} instances, more than "
            f"max-instances-per-study ({section.max_instances_per_study})"
        )
        return _failed(study_uid, reason), None
    usable: dict[str, InstanceRef] = {}
    invalid = 0
    for ref in listed:
        if not (is_dicom_uid(ref.series_uid) and is_dicom_uid(ref.sop_uid)):
            invalid += 1
        else:
            usable.setdefault(ref.sop_uid, ref)
    expected = invalid + len(usable)
    refs = list(usable.values())
    # a listing with unusable entries may be missing what they stand for: it
    # takes nothing out of the cache
    removed = (
        0
        if invalid
        else _remove_unlisted(
            root, study_uid, {cached_path(root, study_uid, ref) for ref in refs}
        )
    )
    missing = [ref for ref in refs if not cached_path(root, study_uid, ref).is_file()]
    cached = len(refs) - len(missing)
    fetched = nbytes = wrong = 0
    error: PacsRequestError | None = None
    if missing:
        pending = {ref.sop_uid for ref in missing}
        deadline = time.monotonic() + section.study_timeout_s
        arriving = backend.fetch(study_uid, missing, refs)
        try:
            for ref, payload in arriving:
                if time.monotonic() > deadline:
                    if isinstance(payload, Path):
                        payload.unlink(missing_ok=True)
                    # a generator: closing it releases the request or association
                    close = getattr(arriving, "close", None)
                    if close is not None:
                        close()
                    raise PacsRequestError(
                        FailureKind.TIMEOUT,
                        f"the study took over {section.study_timeout_s:g} s "
                        "(study-timeout-s)",
                    )
                if ref.sop_uid not in pending:  # sent twice: the first is kept
                    if isinstance(payload, Path):
                        payload.unlink(missing_ok=True)
                    continue
                size = _store(root, incoming, study_uid, ref, payload)
                if size is None:
                    wrong += 1
                    continue
                pending.discard(ref.sop_uid)
                fetched += 1
                nbytes += size
        except PacsRequestError as err:
            error = err
    got = cached + fetched
    if got == expected:
        status = StudyStatus.FETCHED if fetched else StudyStatus.CACHED
        outcome = PacsStudyOutcome(
            study_uid, status, expected, cached, fetched, nbytes, removed=removed
        )
        return outcome, error
    causes = []
    if invalid:
        causes.append(f"invalid-uid: {invalid} listed by the PACS without DICOM UIDs")
    if wrong:
        causes.append(f"invalid-instance: {wrong} not the instance asked for")
    if error is not None:
        causes.append(_reason(error))
    reason = f"partial: expected {expected} instances, got {got}"
    reason += f" ({'; '.join(causes)})" if causes else ""
    outcome = PacsStudyOutcome(
        study_uid,
        StudyStatus.PARTIAL,
        expected,
        cached,
        fetched,
        nbytes,
        reason,
        removed,
    )
    return outcome, error


def _store(
    root: Path, incoming: Path, study_uid: str, ref: InstanceRef, payload: Payload
) -> int | None:
    """Move one fetched instance into the cache; its size, or None if it is not it."""
    if isinstance(payload, Path):
        part = payload
    else:
        part = incoming / f"{uuid.uuid4().hex}.part"
        part.write_bytes(payload)
    try:
        if not _holds(part, study_uid, ref):
            return None
        dest = cached_path(root, study_uid, ref)
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = part.stat().st_size
        os.replace(part, dest)
        return size
    finally:
        part.unlink(missing_ok=True)


def _holds(path: Path, study_uid: str, ref: InstanceRef) -> bool:
    """Whether the file's header names the study, series and instance asked for."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_UID_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return False
    found = [str(header.get(tag, "")) for tag in _UID_TAGS]
    return found == [study_uid, ref.series_uid, ref.sop_uid]


def _echo(backend: PacsBackend, section: PacsSection) -> None:
    try:
        backend.echo()
    except PacsRequestError as err:
        raise _unreachable(section, err) from None


def _unreachable(section: PacsSection, err: PacsRequestError) -> SourceUnreachable:
    pacs = section.describe()
    if err.kind is FailureKind.CREDENTIALS:
        return SourceUnreachable(
            f"{pacs} refused the credentials of user {section.username!r} "
            f"({err.detail})",
            hint="Check `username` in [data.pacs] and the password in its "
            "password-file or password-env, and that this user may read the PACS.",
        )
    where = (
        "`url` in [data.pacs] (the DICOMweb root)"
        if section.protocol is PacsProtocol.DICOMWEB
        else "`host`, `port` and `called-ae` in [data.pacs]"
    )
    if err.kind is FailureKind.REFUSED:
        return SourceUnreachable(
            f"{pacs} refused the request: {err.detail}",
            hint=f"Check {where}; for DIMSE the PACS must list AE "
            f"{section.calling_ae!r} with this host's address."
            if section.protocol is PacsProtocol.DIMSE
            else f"Check {where}: QIDO-RS must answer at <url>/studies.",
        )
    what = "timed out" if err.kind is FailureKind.TIMEOUT else "is unreachable"
    return SourceUnreachable(
        f"{pacs} {what}: {err.detail}",
        hint=f"Check {where}, that the PACS is running, and that its firewall lets "
        f"this host connect (timeout-s is {section.timeout_s:g}).",
    )


def _reason(err: PacsRequestError) -> str:
    if err.kind is FailureKind.CREDENTIALS:
        return f"refused: the PACS refused the credentials ({err.detail})"
    return f"{err.kind.value}: {err.detail}"


def _give_up(error: PacsRequestError | None, timeouts: int) -> str | None:
    """The reason for the studies not tried, once the PACS is gone for this sync."""
    if error is None:
        return None
    if error.kind is FailureKind.UNREACHABLE:
        return "unreachable: not tried, the PACS became unreachable during the sync"
    if error.kind is FailureKind.CREDENTIALS:
        return "refused: not tried, the PACS refused the credentials during the sync"
    if timeouts >= TIMEOUTS_IN_A_ROW:
        return (
            f"timeout: not tried after {timeouts} studies in a row timed out or "
            "broke off"
        )
    return None


def _failed(study_uid: str, reason: str, removed: int = 0) -> PacsStudyOutcome:
    return PacsStudyOutcome(
        study_uid, StudyStatus.FAILED, reason=reason, removed=removed
    )


def _remove_unlisted(root: Path, study_uid: str, listed: set[Path]) -> int:
    """Move the study's cached files not in ``listed`` out of what trains.

    Called only with a listing the PACS gave (an empty one: the study is gone).
    The files go to ``<cache-dir>/pacs-removed/<study>``, beside the indexed
    folder rather than deleted: a PACS that answers short by mistake (a nearline
    study, a capped listing) costs a fetch, and the site can look at what went.
    """
    folder = root / study_uid  # study_uid is a DICOM UID: the folder is in root
    if not folder.is_dir():
        return 0
    aside = root.parent / REMOVED_FOLDER / study_uid
    removed = 0
    for path in sorted(folder.rglob("*"), reverse=True):  # files before folders
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif path not in listed:
            target = aside / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            removed += 1
    if not any(folder.iterdir()):
        folder.rmdir()
    return removed


def _log_study(outcome: PacsStudyOutcome) -> None:
    # A UID that is not a DICOM UID may be anything (a name in the wrong column).
    uid = outcome.study_uid if is_dicom_uid(outcome.study_uid) else "(not a UID)"
    logger.debug(
        "PACS study %s: %s, %d listed, %d cached, %d fetched%s",
        uid,
        outcome.status.value,
        outcome.expected,
        outcome.cached,
        outcome.fetched,
        f"; {outcome.reason}" if outcome.reason else "",
    )


def _clear(incoming: Path) -> None:
    for part in incoming.glob("*.part"):
        part.unlink(missing_ok=True)
