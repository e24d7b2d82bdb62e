"""Index a site's DICOM folders by Study/Series/SOP Instance UID, incrementally.

Only headers are read (``stop_before_pixels``). The index is cached as Parquet in
the site's cache folder; the next call re-reads only files that are new or whose
size or modification time changed, and drops files that are gone. Files that are
not usable DICOM images stay in the index with a ``status`` from the fixed
vocabulary of :mod:`.decode` saying why; they never stop the indexing. Headers are
read in worker processes (all cores by default) in chunks, and rows are kept as
Arrow record batches, so memory grows by a few hundred bytes per file, not by
Python objects per file. pydicom's warnings about a file are kept in its row, by
kind, not printed. One SOP Instance UID may be indexed in several files (a
re-send, a copy in another transfer syntax): the index keeps them all, and
:func:`.join.study_series` uses each instance once.

Folder links are followed, each folder is listed once (a link to a parent folder
is no loop), and :func:`walk_files` is the walk every command uses, so ``site
check``, training and ``site deid`` see the same files. A name that is not UTF-8
(an old ISO-8859 share) is kept as an escaped ``file://`` URI in the ``path``
column: read that column with :func:`file_path`.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydicom

from ..common.errors import DataError
from . import decode, dicom_warnings
from .decode import BROKEN_LINK, OK, DecodeFailure
from .dicom_walk import file_path, stored_path, walk_entries, walk_files

logger = logging.getLogger(__name__)

INDEX_FILE = "dicom-index.parquet"
__all__ = [
    "BROKEN_LINK",
    "INDEX_FILE",
    "INDEX_SCHEMA",
    "OK",
    "file_path",
    "index_dicom",
    "read_header",
    "stored_path",
    "walk_files",
]

INDEX_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("modality", pa.string()),
        ("body_part", pa.string()),
        ("transfer_syntax", pa.string()),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("frames", pa.int32()),
        ("instance_number", pa.int32()),
        ("slice_position", pa.float64()),
        ("photometric", pa.string()),
        ("burned_in", pa.bool_()),
        ("identity_removed", pa.bool_()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("status", pa.string()),
        ("warnings", pa.list_(pa.string())),  # kinds of pydicom's warnings
    ]
)

_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"}
_LONG_VRS |= {b"UR", b"UT", b"UV"}  # explicit VRs with a 4-byte length
_TAGS = [
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "BodyPartExamined",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "InstanceNumber",
    "ImagePositionPatient",
    "SliceLocation",
    "PhotometricInterpretation",
    "BurnedInAnnotation",
    "PatientIdentityRemoved",
]
_CHUNK = 256
_PARALLEL_FROM = 512  # fewer new files than this are read in this process


def not_folders(paths: Iterable[Path]) -> list[str]:
    """Each path that is not a folder, with what it is instead."""
    return [
        f"{path} ({'a file, not a folder' if path.exists() else 'not found'})"
        for path in map(Path, paths)
        if not path.is_dir()
    ]


def index_dicom(
    folders: list[Path], cache_dir: Path, *, workers: int | None = None
) -> pa.Table:
    """Index every file under ``folders``; return the index table sorted by path.

    Parameters
    ----------
    folders
        DICOM folders, any layout; a missing one raises :class:`DataError`.
    cache_dir
        Holds ``dicom-index.parquet``; rows of files whose size and mtime are
        unchanged are reused.
    workers
        Processes reading headers (default: all cores); 1 reads in this process.
    """
    folders = [Path(f) for f in folders]
    missing = not_folders(folders)
    if missing:
        raise DataError(
            "DICOM folder(s) not usable: " + ", ".join(missing),
            hint="Fix `data.dicom-dirs` in site.toml (paths relative to site.toml).",
        )
    cache_dir = Path(cache_dir)
    cached = _load_cache(cache_dir / INDEX_FILE)
    known = _cache_keys(cached)
    keep: list[int] = []
    todo: list[tuple[str, int, int]] = []
    unlisted: list[str] = []
    broken: list[str] = []
    seen = 0
    for _, real, stat in walk_entries(folders, skip=cache_dir, unlisted=unlisted):
        seen += 1
        old = known.pop(stored_path(real), None)
        if stat is None:
            broken.append(real)
        # unchanged size and mtime: reuse the row unless it may read otherwise now
        elif old is not None and old[:2] == (stat.st_size, stat.st_mtime_ns) and old[3]:
            keep.append(old[2])
        else:
            todo.append((real, stat.st_size, stat.st_mtime_ns))
    for path in unlisted:
        known.pop(stored_path(path), None)
    n_gone = len(known)
    del known
    parts = [cached.take(pa.array(keep, pa.int64()))] if keep else []
    parts += list(_read_all(todo, workers))
    parts += [_status_rows(unlisted, decode.FOLDER_NO_PERMISSION)] if unlisted else []
    parts += [_status_rows(broken, BROKEN_LINK)] if broken else []
    table = (
        pa.concat_tables(parts).combine_chunks()
        if parts
        else INDEX_SCHEMA.empty_table()
    )
    table = table.sort_by("path")
    if todo or broken or n_gone or not (cache_dir / INDEX_FILE).is_file():
        _save_cache(table, cache_dir)
    n_ok = pc.sum(pc.equal(table.column("status"), OK)).as_py() or 0
    logger.info(
        "DICOM index: %d files (%d usable), %d read, %d from cache, %d removed",
        seen,
        n_ok,
        len(todo),
        len(keep),
        n_gone,
    )
    return table


def _read_all(
    todo: list[tuple[str, int, int]], workers: int | None
) -> Iterator[pa.Table]:
    chunks = [todo[i : i + _CHUNK] for i in range(0, len(todo), _CHUNK)]
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(todo) < _PARALLEL_FROM:
        for chunk in chunks:
            yield _read_chunk(chunk)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_read_chunk, chunks)


def _read_chunk(chunk: list[tuple[str, int, int]]) -> pa.Table:
    rows = [_read_header(Path(p), size, mtime) for p, size, mtime in chunk]
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def _status_rows(paths: list[str], status: str) -> pa.Table:
    """Rows for paths whose header is not read: unlisted folders, broken links."""
    rows = [_status_row(path, status) for path in paths]
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def _status_row(path: str, status: str) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in INDEX_SCHEMA.names}
    row.update(path=stored_path(path), size=0, mtime_ns=0, status=status)
    return row


def _load_cache(path: Path) -> pa.Table:
    if not path.is_file():
        return INDEX_SCHEMA.empty_table()
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        logger.warning(
            "DICOM index cache %s is unreadable (%s); rebuilding it",
            path,
            type(exc).__name__,
        )
        return INDEX_SCHEMA.empty_table()
    if table.schema != INDEX_SCHEMA:
        logger.info("DICOM index cache %s has an old layout; rebuilding it", path)
        return INDEX_SCHEMA.empty_table()
    return table


def _cache_keys(table: pa.Table) -> dict[str, tuple[int, int, int, bool]]:
    """Path -> (size, mtime_ns, row, reusable).

    A row is not reusable when what refused it may have changed without changing
    the file: a permission granted since, a codec installed since.
    """
    paths = table.column("path").to_pylist()
    sizes = table.column("size").to_pylist()
    mtimes = table.column("mtime_ns").to_pylist()
    statuses = table.column("status").to_pylist()
    syntaxes = table.column("transfer_syntax").to_pylist()
    codec: dict[str, str] = {}  # transfer syntax -> its codec status now
    for status, syntax in zip(statuses, syntaxes, strict=True):
        if status == decode.NEEDS_CODEC and syntax not in codec:
            codec[syntax] = decode.codec_status(syntax)
    return {
        p: (s, m, i, _reusable(status, codec.get(syntax)))
        for i, (p, s, m, status, syntax) in enumerate(
            zip(paths, sizes, mtimes, statuses, syntaxes, strict=True)
        )
    }


def _reusable(status: str, codec_now: str | None) -> bool:
    if status in decode.PERMISSION_STATUSES:
        return False
    return status != decode.NEEDS_CODEC or codec_now == decode.NEEDS_CODEC


def _save_cache(table: pa.Table, cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{INDEX_FILE}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, cache_dir / INDEX_FILE)


def _text(ds: Any, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element is as good as absent
        return None
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value is not None and value != "" else None
    except Exception:  # noqa: BLE001 - e.g. a value cut short by the end of the file
        return None


def _slice_position(ds: pydicom.Dataset) -> float | None:
    try:
        position = ds.get("ImagePositionPatient")
        if position is not None and len(position) == 3:
            return float(position[2])
        location = ds.get("SliceLocation")
        return float(location) if location is not None else None
    except Exception:  # noqa: BLE001 - a malformed element is as good as absent
        return None


def read_header(path: Path) -> dict[str, Any]:
    """One file's index row (its ``status`` says whether it is a usable image)."""
    try:
        stat = Path(path).stat()
    except OSError:  # not found, or a loop of links
        if not Path(path).is_symlink():
            raise
        return _status_row(str(path), BROKEN_LINK)
    return _read_header(Path(path), stat.st_size, stat.st_mtime_ns)


def _read_header(path: Path, size: int, mtime_ns: int) -> dict[str, Any]:
    """Read one file's header into an index row; never raises for bad files.

    pydicom's warnings are kept in the row by kind (:mod:`.dicom_warnings`), so a
    report counts them the same from the cache, and they never reach a terminal.
    """
    with dicom_warnings.capture() as kinds:
        row = _header_row(path, size, mtime_ns)
    row["warnings"] = kinds or None
    return row


def _header_row(path: Path, size: int, mtime_ns: int) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in INDEX_SCHEMA.names}
    row.update(path=stored_path(str(path)), size=size, mtime_ns=mtime_ns)
    pixel_offset: int | None = None
    ds: pydicom.Dataset  # a FileDataset from dcmread, a plain Dataset from the fallback
    try:
        with path.open("rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=_TAGS)
            pixel_offset = handle.tell()
    except pydicom.errors.InvalidDicomError:
        try:
            ds = decode.read_dataset(path, stop_before_pixels=True)
        except DecodeFailure as exc:
            row["status"] = exc.reason
            return row
    except PermissionError:
        row["status"] = decode.NO_PERMISSION
        return row
    except Exception:  # noqa: BLE001 - any unreadable file is recorded, not fatal
        row["status"] = decode.UNREADABLE
        return row
    meta = getattr(ds, "file_meta", None)
    ts = _text(meta, "TransferSyntaxUID") if meta is not None else None
    burned = _text(ds, "BurnedInAnnotation")
    removed = _text(ds, "PatientIdentityRemoved")
    row.update(
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        transfer_syntax=ts,
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        frames=_int(ds, "NumberOfFrames") or 1,
        instance_number=_int(ds, "InstanceNumber"),
        slice_position=_slice_position(ds),
        photometric=_text(ds, "PhotometricInterpretation"),
        burned_in=None if burned is None else burned.upper() == "YES",
        identity_removed=None if removed is None else removed.upper() == "YES",
    )
    row["status"] = _status(ds, row, path, pixel_offset, size)
    return row


def _status(
    ds: pydicom.Dataset, row: dict[str, Any], path: Path, offset: int | None, size: int
) -> str:
    if not row["rows"] or not row["columns"]:
        if _cut_short(ds, path, size):
            return decode.UNREADABLE
        # an image class without rows: e.g. cut off between two of its elements
        return decode.MISSING_ATTRIBUTE if _image_class(ds) else decode.NO_PIXELS
    if not row["study_uid"]:
        return "no StudyInstanceUID"
    if not row["sop_uid"]:
        return "no SOPInstanceUID"
    codec = decode.codec_status(row["transfer_syntax"])
    if codec != OK:
        return codec
    if (
        offset is None
        or row["transfer_syntax"] == pydicom.uid.DeflatedExplicitVRLittleEndian
    ):
        return OK  # raw or deflated data set: checked when decoded
    return _pixel_status(ds, path, offset, size)


def _image_class(ds: pydicom.Dataset) -> bool:
    """Whether the SOP class is an image's (an SR, a PR, a KOS is not one)."""
    meta = getattr(ds, "file_meta", None)
    uid = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    return uid is not None and "Image Storage" in pydicom.uid.UID(uid).name


def _encoding(ds: pydicom.Dataset) -> tuple[bool, bool]:
    """(little endian, implicit VR) of the data set, from its transfer syntax."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is None:
        return True, False
    try:
        return bool(ts.is_little_endian), bool(ts.is_implicit_VR)
    except (AttributeError, ValueError):  # not a transfer syntax UID
        return True, False


def _cut_short(ds: pydicom.Dataset, path: Path, size: int) -> bool:
    """Whether the file ends inside a data element: its header was cut off.

    pydicom stops quietly at the end of a file, even inside an element, so a file
    cut off in its header reads as a short data set without pixels, like an SR.
    """
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return False  # element lengths are inside the deflated stream
    little, implicit = _encoding(ds)
    with path.open("rb") as handle:
        return ends_inside_an_element(handle, size, little=little, implicit=implicit)


def ends_inside_an_element(
    handle: BinaryIO, size: int, *, little: bool, implicit: bool
) -> bool:
    """Whether the DICOM file in ``handle`` ends before its last element does.

    Steps over the elements by their lengths: the file meta (explicit VR little
    endian), then the data set in the given encoding. An element of undefined
    length (a sequence, encapsulated pixel data) is stepped into: its items and
    delimiters are elements too. Only the byte structure is read, never a value.
    """
    handle.seek(128)
    pos = 132 if handle.read(4) == b"DICM" else 0
    in_meta = True
    while pos < size:
        handle.seek(pos)
        head = handle.read(12)
        if len(head) < 8:
            return True
        in_meta = in_meta and head[:2] == b"\x02\x00"
        end = "<" if in_meta or little else ">"
        (group,) = struct.unpack(end + "H", head[:2])
        explicit = in_meta or not implicit
        if group == 0xFFFE or not explicit or not head[4:6].isalpha():
            (length,) = struct.unpack(end + "L", head[4:8])  # items: always so
            pos += 8
        elif head[4:6] in _LONG_VRS:
            if len(head) < 12:
                return True
            (length,) = struct.unpack(end + "L", head[8:12])
            pos += 12
        else:
            (length,) = struct.unpack(end + "H", head[6:8])
            pos += 8
        if length != _UNDEFINED_LENGTH:
            pos += length
    return pos > size


def _pixel_status(ds: pydicom.Dataset, path: Path, offset: int, size: int) -> str:
    """Check that a pixel data element follows the header and fits in the file."""
    little, implicit = _encoding(ds)
    with path.open("rb") as handle:
        handle.seek(offset)
        head = handle.read(12)
    if len(head) < 8:
        return decode.TRUNCATED
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    if (group, elem) not in _PIXEL_TAGS:
        return decode.NO_PIXELS
    if implicit or not head[4:6].isalpha():  # some files lie about explicit VR
        (length,) = struct.unpack(end + "L", head[4:8])
        start = offset + 8
    else:
        if len(head) < 12:
            return decode.TRUNCATED
        (length,) = struct.unpack(end + "L", head[8:12])
        start = offset + 12
    if length != _UNDEFINED_LENGTH and start + length > size:
        return decode.TRUNCATED
    return OK
