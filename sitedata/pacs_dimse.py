"""Reading a PACS over DIMSE: C-FIND to list a study, C-GET or C-MOVE to fetch it.

The query is hierarchical (study -> series -> instances) so strict PACS answer it.
C-GET proposes, for each SOP class the query found, one presentation context per
transfer syntax, so the PACS can send every instance in the syntax it stored rather
than transcode it. C-MOVE runs a Storage SCP for the length of one retrieve that
accepts only the PACS's AE and keeps only the instances asked for. Received data
sets are written as they came, without decoding
(:meth:`pynetdicom.events.Event.encoded_dataset`). They are not the PACS's files
byte for byte: DIMSE carries no file meta information, so pynetdicom writes its own,
and the PACS's toolkit encodes the data set as it sends it (Orthanc's DCMTK keeps
plain data sets as stored but, for compressed ones, writes Pixel Data as OB and drops
trailing padding; the compressed frames themselves are not touched). A site that
needs its dataset fingerprint to match the files on disk uses DICOMweb. Nothing is
ever stored to the PACS.
"""

from __future__ import annotations

import logging
import queue
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    StoragePresentationContexts,
    build_role,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.transport import ThreadedAssociationServer

from .pacs_backend import (
    FailureKind,
    InstanceRef,
    PacsRequestError,
    Payload,
    is_dicom_uid,
)
from .pacs_config import DimseRetrieve, PacsSection

# pynetdicom.sop_class makes these names at import time, out of a type checker's
# sight; the UIDs are the standard's (PS3.4 C.6.2.1 and A.4).
VERIFICATION = "1.2.840.10008.1.1"
FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Query/Retrieve - MOVE
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Query/Retrieve - GET
# The library logs every request at INFO; a site's log keeps our one line per sync.
if logging.getLogger("pynetdicom").level == logging.NOTSET:
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

logger = logging.getLogger(__name__)
_PENDING = (0xFF00, 0xFF01)
_SUCCESS = 0x0000
_WARNING = 0xB000  # some sub-operations failed: the missing ones are counted
_REFUSED = 0xC000  # a C-STORE we do not take (PS3.4 GG.4: "cannot understand")
_MAX_CONTEXTS = 128  # an association request holds at most 128 presentation contexts
# Transfer syntaxes proposed first when a study's SOP classes leave little room.
_FIRST = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
_SYNTAXES = _FIRST + [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _FIRST]
# Offered for instances whose SOP class the C-FIND answer left out.
_COMMON_CLASSES = [
    str(cx.abstract_syntax) for cx in StoragePresentationContexts if cx.abstract_syntax
][:32]


class DimseBackend:
    """C-ECHO, C-FIND and C-GET / C-MOVE against one PACS AE."""

    def __init__(self, section: PacsSection, incoming: Path | None) -> None:
        if section.host is None or section.port is None or section.called_ae is None:
            raise ValueError("a DIMSE PACS needs host, port and called-ae")
        self._section = section
        self._host = section.host
        self._port = section.port
        self._called_ae = section.called_ae
        self._incoming = incoming
        # What the current fetch asked for, and what came (C-MOVE: from the SCP's
        # threads; C-GET: from this one).
        self._wanted: dict[str, InstanceRef] = {}
        self._received: queue.SimpleQueue[tuple[InstanceRef, Path]] = (
            queue.SimpleQueue()
        )
        self._server: ThreadedAssociationServer | None = None
        self._addresses: frozenset[str] | None = None  # the PACS host's, resolved
        self._finder: Association | None = None  # C-FIND, kept for the sync

    def echo(self) -> None:
        """C-ECHO: the PACS answers and accepts our AE title."""
        ae = self._ae()
        ae.add_requested_context(VERIFICATION)
        assoc = self._associate(ae)
        try:
            status = assoc.send_c_echo()
            self._check_final(status, "C-ECHO")
        finally:
            _release(assoc)

    def find_instances(self, study_uid: str) -> list[InstanceRef]:
        """C-FIND the study's series, then each series's instances.

        One association serves every query of a sync; if the PACS closed it while
        idle, the query is asked once more on a new one.
        """
        reused = self._finder is not None and self._finder.is_established
        try:
            return self._find_study(self._find_association(), study_uid)
        except PacsRequestError as err:
            self._drop_finder()
            if not (reused and err.kind is FailureKind.UNREACHABLE):
                raise
        return self._find_study(self._find_association(), study_uid)

    def _find_association(self) -> Association:
        if self._finder is None or not self._finder.is_established:
            ae = self._ae()
            ae.add_requested_context(FIND_MODEL)
            self._finder = self._associate(ae)
        return self._finder

    def _drop_finder(self) -> None:
        if self._finder is not None:
            _release(self._finder)
            self._finder = None

    def _find_study(self, assoc: Association, study_uid: str) -> list[InstanceRef]:
        series = [
            _text(found, "SeriesInstanceUID")
            for found in self._find(
                assoc,
                _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=""),
            )
        ]
        refs: dict[str, InstanceRef] = {}
        for series_uid in dict.fromkeys(series):
            if not is_dicom_uid(series_uid):
                # Not sent back to the PACS; counted as an instance whose UID is
                # unusable, so the study says why it is incomplete.
                refs[f"invalid-series-{len(refs)}"] = InstanceRef(series_uid, "")
                continue
            query = _identifier(
                "IMAGE",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid,
                SOPInstanceUID="",
                SOPClassUID="",
            )
            for found in self._find(assoc, query):
                sop_uid = _text(found, "SOPInstanceUID")
                sop_class = _text(found, "SOPClassUID") or None
                refs.setdefault(sop_uid, InstanceRef(series_uid, sop_uid, sop_class))
        return list(refs.values())

    def fetch(
        self, study_uid: str, missing: list[InstanceRef], listed: list[InstanceRef]
    ) -> Iterator[tuple[InstanceRef, Payload]]:
        """C-GET (or C-MOVE) the missing instances, by study or series where it can."""
        if self._incoming is None:
            raise ValueError("fetching over DIMSE needs a folder to receive into")
        self._wanted = {ref.sop_uid: ref for ref in missing}
        queries = list(_retrieve_queries(study_uid, missing, listed))
        try:
            if self._section.retrieve is DimseRetrieve.C_MOVE:
                yield from self._move(queries)
            else:
                yield from self._get(queries, missing)
        finally:
            self._wanted = {}

    def close(self) -> None:
        """Release the query association; stop the C-MOVE Storage SCP if started."""
        self._drop_finder()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Event) -> int:
        """A C-STORE sub-operation of our C-GET or C-MOVE: keep it if asked for."""
        if event.assoc.is_acceptor and not self._from_the_pacs(event):
            # C-MOVE's Storage SCP listens on the network: an AE title is a name
            # any caller may choose, so only the PACS's own addresses may store.
            return _REFUSED
        sop_uid = getattr(event.request, "AffectedSOPInstanceUID", None)
        ref = self._wanted.get(str(sop_uid or ""))
        if ref is None or self._incoming is None:
            return _SUCCESS  # not asked for: acknowledged, not kept
        part = self._incoming / f"{uuid.uuid4().hex}.part"
        part.write_bytes(event.encoded_dataset())
        self._received.put((ref, part))
        return _SUCCESS

    def _from_the_pacs(self, event: Event) -> bool:
        address = str(event.assoc.requestor.address)
        if address in self._pacs_addresses():
            return True
        logger.warning(
            "C-MOVE store from %s refused: not an address of %s",
            address,
            self._section.describe(),
        )
        return False

    def _pacs_addresses(self) -> frozenset[str]:
        if self._addresses is None:
            try:
                infos = socket.getaddrinfo(self._section.host, None)
            except OSError:
                infos = []
            found = {str(info[4][0]) for info in infos}
            # an IPv4 peer may appear as ::ffff:a.b.c.d on a dual-stack socket
            found |= {f"::ffff:{a}" for a in found if ":" not in a}
            self._addresses = frozenset(found)
        return self._addresses

    def _get(
        self, queries: list[Dataset], missing: list[InstanceRef]
    ) -> Iterator[tuple[InstanceRef, Payload]]:
        ae = self._ae()
        ae.add_requested_context(GET_MODEL)
        classes = sorted({ref.sop_class_uid for ref in missing if ref.sop_class_uid})
        if any(ref.sop_class_uid is None for ref in missing):  # the PACS did not say
            classes += [uid for uid in _COMMON_CLASSES if uid not in classes]
        roles: list[str] = []
        for sop_class, syntax in _storage_contexts(classes, _MAX_CONTEXTS - 1):
            ae.add_requested_context(sop_class, syntax)
            if sop_class not in roles:
                roles.append(sop_class)
        assoc = self._associate(
            ae,
            ext_neg=[build_role(uid, scp_role=True) for uid in roles],
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        finished = False
        try:
            yield from self._retrieve(assoc, queries, "C-GET", None)
            finished = True
        finally:
            _end(assoc, finished)

    def _move(self, queries: list[Dataset]) -> Iterator[tuple[InstanceRef, Payload]]:
        self._listen()
        ae = self._ae()
        ae.add_requested_context(MOVE_MODEL)
        assoc = self._associate(ae)
        finished = False
        try:
            yield from self._retrieve(
                assoc, queries, "C-MOVE", self._section.calling_ae
            )
            finished = True
        finally:
            _end(assoc, finished)

    def _listen(self) -> None:
        """Start the Storage SCP that C-MOVE sends to; it runs until :meth:`close`."""
        if self._server is not None:
            return
        scp = self._ae()
        scp.require_calling_aet = [self._called_ae]
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax:
                scp.add_supported_context(
                    context.abstract_syntax, ALL_TRANSFER_SYNTAXES
                )
        address = (self._section.move_bind, self._section.move_port or 0)
        try:
            self._server = scp.start_server(
                address,
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            )
        except OSError as exc:
            raise PacsRequestError(
                FailureKind.UNREACHABLE,
                f"cannot listen on {address[0]}:{address[1]} for C-MOVE "
                f"({exc.strerror or type(exc).__name__})",
            ) from None

    def _retrieve(
        self,
        assoc: Association,
        queries: list[Dataset],
        what: str,
        move_aet: str | None,
    ) -> Iterator[tuple[InstanceRef, Payload]]:
        failed: int | None = None
        # Each pending status restarts the answer timer, so a PACS could keep a
        # retrieve pending for ever: the whole study has its own limit.
        deadline = time.monotonic() + self._section.study_timeout_s
        for query in queries:
            started = time.monotonic()
            responses = (
                assoc.send_c_move(query, move_aet, MOVE_MODEL)
                if move_aet
                else assoc.send_c_get(query, GET_MODEL)
            )
            for status, _ in responses:
                yield from _drain(self._received)
                if "Status" not in status:
                    self._raise_no_answer(what, started)
                code = int(status.Status)
                if code in _PENDING:
                    started = time.monotonic()
                    if started > deadline:
                        raise PacsRequestError(
                            FailureKind.TIMEOUT,
                            f"{what} still pending after "
                            f"{self._section.study_timeout_s:g} s (study-timeout-s)",
                        )
                    continue
                if code not in (_SUCCESS, _WARNING):
                    failed = code
        yield from _drain(self._received)
        if failed is not None:
            raise PacsRequestError(FailureKind.REFUSED, f"{what} status 0x{failed:04X}")

    def _find(self, assoc: Association, query: Dataset) -> Iterator[Dataset]:
        started = time.monotonic()
        for status, found in assoc.send_c_find(query, FIND_MODEL):
            if "Status" not in status:
                self._raise_no_answer("C-FIND", started)
            if int(status.Status) in _PENDING:
                if found is not None:
                    yield found
                started = time.monotonic()
                continue
            self._check_final(status, "C-FIND")

    def _ae(self) -> AE:
        ae = AE(ae_title=self._section.calling_ae)
        timeout = self._section.timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        return ae

    def _associate(
        self,
        ae: AE,
        ext_neg: list[SCP_SCU_RoleSelectionNegotiation] | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
    ) -> Association:
        handlers: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, _no_delay)]
        assoc = ae.associate(
            self._host,
            self._port,
            ae_title=self._called_ae,
            ext_neg=list(ext_neg or []),
            evt_handlers=handlers + (evt_handlers or []),
        )
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            reply = assoc.acceptor.primitive
            reason = getattr(reply, "reason_str", "no reason given")
            raise PacsRequestError(
                FailureKind.REFUSED, f"association rejected ({reason})"
            )
        failure = self._connect_failure()
        if failure is not None:
            raise failure
        raise PacsRequestError(
            FailureKind.REFUSED,
            "association aborted: the PACS accepted none of the services asked, or "
            f"gave no association within {self._section.timeout_s:g} s",
        )

    def _connect_failure(self) -> PacsRequestError | None:
        """Why a plain TCP connection to the PACS fails (None: it does not)."""
        timeout = self._section.timeout_s
        try:
            with socket.create_connection((self._host, self._port), timeout=timeout):
                return None
        except TimeoutError:
            return PacsRequestError(
                FailureKind.TIMEOUT, f"no connection within {timeout:g} s"
            )
        except ConnectionRefusedError:
            return PacsRequestError(FailureKind.UNREACHABLE, "connection refused")
        except socket.gaierror:
            return PacsRequestError(FailureKind.UNREACHABLE, "host name not found")
        except OSError as exc:
            return PacsRequestError(
                FailureKind.UNREACHABLE,
                f"cannot connect ({exc.strerror or type(exc).__name__})",
            )

    def _raise_no_answer(self, what: str, started: float) -> None:
        if time.monotonic() - started >= self._section.timeout_s * 0.9:
            raise PacsRequestError(
                FailureKind.TIMEOUT,
                f"no {what} answer within {self._section.timeout_s:g} s",
            )
        raise PacsRequestError(
            FailureKind.UNREACHABLE, f"the PACS ended the association during {what}"
        )

    def _check_final(self, status: Dataset, what: str) -> None:
        if "Status" not in status:
            raise PacsRequestError(
                FailureKind.TIMEOUT,
                f"no {what} answer within {self._section.timeout_s:g} s",
            )
        if int(status.Status) != _SUCCESS:
            raise PacsRequestError(
                FailureKind.REFUSED, f"{what} status 0x{int(status.Status):04X}"
            )


def _identifier(level: str, **keys: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query


def _retrieve_queries(
    study_uid: str, missing: list[InstanceRef], listed: list[InstanceRef]
) -> Iterator[Dataset]:
    """The fewest C-GET/C-MOVE identifiers that ask for ``missing`` and little else."""
    if len({r.sop_uid for r in missing}) == len({r.sop_uid for r in listed}):
        yield _identifier("STUDY", StudyInstanceUID=study_uid)
        return
    by_series: dict[str, list[InstanceRef]] = {}
    for ref in missing:
        by_series.setdefault(ref.series_uid, []).append(ref)
    for series_uid, refs in by_series.items():
        if len(refs) == sum(r.series_uid == series_uid for r in listed):
            yield _identifier(
                "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid
            )
            continue
        for ref in refs:
            yield _identifier(
                "IMAGE",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid,
                SOPInstanceUID=ref.sop_uid,
            )


def _storage_contexts(classes: list[str], room: int) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs: one context each, ``room`` at most.

    Each class gets an equal share of the room, its syntaxes in :data:`_SYNTAXES`
    order, so a study of a few classes is offered every syntax.
    """
    if not classes:
        return []
    per_class = max(1, room // len(classes))
    pairs = [(uid, ts) for uid in classes for ts in _SYNTAXES[:per_class]]
    return pairs[:room]


def _drain(
    received: queue.SimpleQueue[tuple[InstanceRef, Path]],
) -> Iterator[tuple[InstanceRef, Payload]]:
    while True:
        try:
            yield received.get_nowait()
        except queue.Empty:
            return


def _no_delay(event: Event) -> None:
    """Send each PDU at once (TCP_NODELAY).

    pynetdicom writes a DIMSE command and its data set as two PDUs; with Nagle's
    algorithm the second waits for the PACS's delayed ACK, about 40 ms a request.
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


def _end(assoc: Association, finished: bool) -> None:
    """Release a retrieve's association, or abort one that was abandoned.

    A retrieve given up midway (a timeout, a refused file, the caller stopping)
    may still have sub-operations under way at the PACS: a release would wait
    through them while the PACS keeps sending; an A-ABORT stops them at once.
    """
    if finished:
        _release(assoc)
    elif assoc.is_established:
        assoc.abort()


def _text(found: Dataset, keyword: str) -> str:
    value = found.get(keyword, "")
    return value if isinstance(value, str) else ""
