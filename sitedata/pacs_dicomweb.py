"""Reading a PACS over DICOMweb: QIDO-RS to list a study, WADO-RS to fetch it.

Instances are asked for with ``transfer-syntax=*``, so the PACS sends each file in
the transfer syntax it stored, and the bytes are kept as they came (pydicom's
:attr:`FileDataset.buffer` is the part dicomweb-client decoded from the multipart
answer): a fetched file is the file the PACS holds, byte for byte. Only GETs are sent;
the password goes in the HTTP basic-auth header, never in a URL or a message.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .pacs_backend import FailureKind, InstanceRef, PacsRequestError, Payload
from .pacs_config import PacsSection
from .secrets import LOOPBACK_HOSTS

# The library logs every request at INFO; a site's log keeps our one line per sync.
if logging.getLogger("dicomweb_client").level == logging.NOTSET:
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

_logger = logging.getLogger(__name__)
_AS_STORED = (("application/dicom", "*"),)  # the stored transfer syntax, untouched
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_MAX_PAGES = 10_000  # a PACS that keeps paging past this is not trusted further

T = TypeVar("T")


class DicomWebBackend:
    """QIDO-RS / WADO-RS reads from one DICOMweb service."""

    def __init__(
        self, section: PacsSection, password: str | None, base_dir: Path
    ) -> None:
        if section.url is None:
            raise ValueError("a DICOMweb PACS needs url (checked by PacsSection)")
        session = requests.Session()
        if section.username:
            session.auth = requests.auth.HTTPBasicAuth(section.username, password or "")
            host = urlsplit(section.url).hostname or ""
            if urlsplit(section.url).scheme != "https" and host not in LOOPBACK_HOSTS:
                _logger.warning(
                    "%s: the password goes in clear over http; use https",
                    section.describe(),
                )
        if section.ca_file:
            ca_file = Path(section.ca_file).expanduser()
            session.verify = str(
                ca_file if ca_file.is_absolute() else base_dir / ca_file
            )
        self._session = session
        self._timeout_s = section.timeout_s
        self._client = DICOMwebClient(
            section.url.rstrip("/"), session=session, timeout=section.timeout_s
        )
        # A busy PACS is asked again at the next sync; retrying here would multiply
        # every wait by the attempts.
        self._client.set_http_retry_params(retry=False)

    def echo(self) -> None:
        """One QIDO-RS study search: the service answers and takes the credentials."""
        self._call(lambda: self._client.search_for_studies(limit=1))

    def find_instances(self, study_uid: str) -> list[InstanceRef]:
        """The study's instances, page after page until the PACS has no more."""
        refs: dict[str, InstanceRef] = {}
        offset = 0
        for _ in range(_MAX_PAGES):
            try:
                page = self._call(
                    partial(
                        self._client.search_for_instances,
                        study_instance_uid=study_uid,
                        offset=offset or None,
                        fields=["SeriesInstanceUID", "SOPInstanceUID"],
                    )
                )
            except PacsRequestError as err:
                # Some PACS answer an unknown study with 404 rather than no match
                # (a wrong url fails earlier, at the echo's study search).
                if err.http_status == 404 and not refs:
                    return []
                raise
            if not isinstance(page, list):
                raise PacsRequestError(
                    FailureKind.REFUSED, "a study listing that is not a JSON list"
                )
            new = 0
            for item in page:
                ref = InstanceRef(_text(item, _SERIES_UID), _text(item, _SOP_UID))
                if ref.sop_uid not in refs:
                    refs[ref.sop_uid] = ref
                    new += 1
            # An empty page ends the listing; so does one with nothing new, which
            # a PACS that ignores `offset` would send forever.
            if not new:
                break
            offset += len(page)
        return list(refs.values())

    def fetch(
        self, study_uid: str, missing: list[InstanceRef], listed: list[InstanceRef]
    ) -> Iterator[tuple[InstanceRef, Payload]]:
        """WADO-RS the missing instances: by study or series where all are missing."""
        wanted = {ref.sop_uid: ref for ref in missing}
        retrieve: list[Callable[[], Iterator[Dataset]]] = []
        if len(wanted) == len({ref.sop_uid for ref in listed}):
            retrieve.append(
                partial(self._client.iter_study, study_uid, media_types=_AS_STORED)
            )
        else:
            for series_uid, refs in _by_series(missing).items():
                if len(refs) == sum(ref.series_uid == series_uid for ref in listed):
                    retrieve.append(
                        partial(
                            self._client.iter_series,
                            study_uid,
                            series_uid,
                            media_types=_AS_STORED,
                        )
                    )
                else:
                    retrieve += [partial(self._one, study_uid, ref) for ref in refs]
        for request in retrieve:
            datasets = self._call(request)
            while (dataset := self._call(partial(next, datasets, None))) is not None:
                ref = wanted.get(str(dataset.get("SOPInstanceUID", "")))
                if ref is not None:
                    yield ref, _as_sent(dataset)

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    def _one(self, study_uid: str, ref: InstanceRef) -> Iterator[Dataset]:
        return iter(
            [
                self._client.retrieve_instance(
                    study_uid, ref.series_uid, ref.sop_uid, media_types=_AS_STORED
                )
            ]
        )

    def _call(self, request: Callable[[], T]) -> T:
        """Run one request; its failure as :class:`PacsRequestError`, secret-free."""
        try:
            return request()
        except requests.Timeout:
            raise PacsRequestError(
                FailureKind.TIMEOUT, f"no answer within {self._timeout_s:g} s"
            ) from None
        except requests.exceptions.SSLError:
            raise PacsRequestError(
                FailureKind.UNREACHABLE,
                "the TLS handshake failed (is ca-file the CA that signed the PACS?)",
            ) from None
        except requests.ConnectionError as exc:
            if "timed out" in str(exc):  # a read timeout while streaming
                raise PacsRequestError(
                    FailureKind.TIMEOUT, f"no answer within {self._timeout_s:g} s"
                ) from None
            raise PacsRequestError(
                FailureKind.UNREACHABLE, _connection_reason(exc)
            ) from None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                raise PacsRequestError(
                    FailureKind.CREDENTIALS,
                    f"the PACS refused the credentials (HTTP {status})",
                ) from None
            raise PacsRequestError(
                FailureKind.REFUSED, f"HTTP {status}", http_status=status
            ) from None
        except requests.RequestException as exc:
            # a stream cut midway (ChunkedEncodingError) and the like
            raise PacsRequestError(
                FailureKind.INTERRUPTED, f"the answer broke off ({type(exc).__name__})"
            ) from None
        except (
            InvalidDicomError,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
        ) as exc:
            # dicomweb-client's multipart checks and pydicom's reads raise these, and
            # so does an answer of the wrong shape (no Content-Type, JSON not a list)
            raise PacsRequestError(
                FailureKind.REFUSED,
                f"an answer that is not DICOMweb ({type(exc).__name__})",
            ) from None


def _as_sent(dataset: Dataset) -> bytes:
    buffer = getattr(dataset, "buffer", None)
    if not isinstance(buffer, io.BytesIO):
        # dicomweb-client reads each part with pydicom.dcmread(BytesIO(part)); if
        # that changes, the bytes as sent are gone and re-encoding would not match.
        raise PacsRequestError(
            FailureKind.REFUSED, "the instance's bytes as sent are not available"
        )
    return buffer.getvalue()


def _text(item: dict[str, Any], tag: str) -> str:
    """The first value of a DICOM JSON attribute ('' when absent or not text)."""
    values = item.get(tag, {}).get("Value") if isinstance(item, dict) else None
    if isinstance(values, Sequence) and values and isinstance(values[0], str):
        return values[0]
    return ""


def _by_series(refs: list[InstanceRef]) -> dict[str, list[InstanceRef]]:
    groups: dict[str, list[InstanceRef]] = {}
    for ref in refs:
        groups.setdefault(ref.series_uid, []).append(ref)
    return groups


def _connection_reason(exc: requests.ConnectionError) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "NameResolution" in text:
        return "host name not found"
    if "Connection reset" in text or "RemoteDisconnected" in text:
        return "connection reset by the PACS"
    return f"cannot connect ({type(exc).__name__})"
