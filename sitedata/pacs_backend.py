"""What :mod:`.pacs` asks of a PACS back-end (DICOMweb or DIMSE), and their errors.

A back-end finds a study's instances, fetches the ones asked for and checks that the
PACS answers. It only reads: QIDO-RS and WADO-RS GETs, or C-ECHO, C-FIND, C-GET and
C-MOVE. UIDs that come from the PACS become folder and file names in the site's
cache, so :func:`is_dicom_uid` is checked before any of them is used as one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

# Digits in dot-separated components, none empty, at most 64 characters (PS3.5 9.1).
# Leading zeros, which the standard forbids, are let through: some PACS write them,
# and they cannot make a path leave its folder.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_LENGTH = 64


def is_dicom_uid(value: object) -> bool:
    """Whether ``value`` is a DICOM UID, and so safe as one file or folder name."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_UID_LENGTH
        and _UID.fullmatch(value) is not None
    )


@dataclass(frozen=True)
class InstanceRef:
    """One instance of a study, as the PACS's query listed it."""

    series_uid: str
    sop_uid: str
    sop_class_uid: str | None = None  # DIMSE needs it to negotiate C-GET storage


class FailureKind(StrEnum):
    """Why a request to the PACS failed (the first word of a study's reason)."""

    UNREACHABLE = "unreachable"  # no connection: refused, reset, no route, no name
    TIMEOUT = "timeout"  # no answer within timeout-s
    INTERRUPTED = "interrupted"  # the answer broke off midway (a dropped stream)
    REFUSED = "refused"  # the PACS answered with an error status
    CREDENTIALS = "credentials"  # HTTP 401/403: the PACS refused the credentials


class PacsRequestError(Exception):
    """A request to the PACS failed; ``detail`` never holds a secret."""

    def __init__(
        self, kind: FailureKind, detail: str, *, http_status: int | None = None
    ) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail
        self.http_status = http_status


# What fetch yields per instance: its bytes, or a file the back-end wrote under the
# incoming folder (DIMSE receives into files; the caller moves or removes them).
Payload = bytes | Path


class PacsBackend(Protocol):
    """One protocol's reads from the PACS."""

    def echo(self) -> None:
        """Check that the PACS answers and accepts us; raise PacsRequestError."""
        ...

    def find_instances(self, study_uid: str) -> list[InstanceRef]:
        """The study's instances as the PACS lists them (empty: no such study)."""
        ...

    def fetch(
        self, study_uid: str, missing: list[InstanceRef], listed: list[InstanceRef]
    ) -> Iterator[tuple[InstanceRef, Payload]]:
        """Yield the ``missing`` instances as they arrive, as stored on the PACS.

        ``listed`` is the study's whole listing: where every instance of the study
        (or of a series) is missing, one request fetches them all. Instances that
        do not come are not yielded; a failure midway raises
        :class:`PacsRequestError` after those that came.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...
