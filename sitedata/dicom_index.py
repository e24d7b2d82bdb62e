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
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydicom

from ..common.errors import DataError
from . import decode, dicom_warnings
from .decode import OK, DecodeFailure

logger = logging.getLogger(__name__)

INDEX_FILE = "dicom-index.parquet"
__all__ = ["INDEX_FILE", "INDEX_SCHEMA", "OK", "index_dicom", "read_header"]

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
_TAGS = [
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
    seen = 0
    for path, size, mtime_ns in _walk(folders, skip=cache_dir, unlisted=unlisted):
        seen += 1
        old = known.pop(path, None)
        # a permission granted since does not change size or mtime: read it again
        if old is not None and old[0] == size and old[1] == mtime_ns and old[3]:
            keep.append(old[2])
        else:
            todo.append((path, size, mtime_ns))
    n_gone = len(known)
    del known
    parts = [cached.take(pa.array(keep, pa.int64()))] if keep else []
    parts += list(_read_all(todo, workers))
    if unlisted:
        parts.append(_unlisted_rows(unlisted))
    table = (
        pa.concat_tables(parts).combine_chunks()
        if parts
        else INDEX_SCHEMA.empty_table()
    )
    table = table.sort_by("path")
    if todo or n_gone or not (cache_dir / INDEX_FILE).is_file():
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


def _unlisted_rows(folders: list[str]) -> pa.Table:
    """Index rows for folders that could not be listed: their files are unknown."""
    rows = [
        {
            **{name: None for name in INDEX_SCHEMA.names},
            "path": folder,
            "size": 0,
            "mtime_ns": 0,
            "status": decode.FOLDER_NO_PERMISSION,
        }
        for folder in folders
    ]
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def _walk(
    folders: list[Path], *, skip: Path, unlisted: list[str]
) -> Iterator[tuple[str, int, int]]:
    """Yield (resolved path, size, mtime_ns) of every regular file, once each.

    Folders the account may not list are appended to ``unlisted``, so that the
    report names them instead of leaving their files out unseen.
    """
    skip_resolved = str(skip.resolve())
    seen: set[str] = set()
    stack = [str(Path(f).resolve()) for f in reversed(folders)]
    while stack:
        here = stack.pop()
        if here == skip_resolved:
            continue
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except PermissionError:
            unlisted.append(here)
            continue
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir():
                    subdirs.append(os.path.realpath(entry.path))
                elif entry.is_file():
                    path = os.path.realpath(entry.path)
                    if path in seen:
                        continue
                    seen.add(path)
                    stat = entry.stat()
                    yield path, stat.st_size, stat.st_mtime_ns
            except OSError:
                continue
        stack.extend(reversed(subdirs))


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
    """Path -> (size, mtime_ns, row, reusable); a row refused for permission is not."""
    paths = table.column("path").to_pylist()
    sizes = table.column("size").to_pylist()
    mtimes = table.column("mtime_ns").to_pylist()
    statuses = table.column("status").to_pylist()
    return {
        p: (s, m, i, status not in decode.PERMISSION_STATUSES)
        for i, (p, s, m, status) in enumerate(
            zip(paths, sizes, mtimes, statuses, strict=True)
        )
    }


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
    except (TypeError, ValueError, OverflowError):
        return None


def _slice_position(ds: pydicom.Dataset) -> float | None:
    try:
        position = ds.get("ImagePositionPatient")
        if position is not None and len(position) == 3:
            return float(position[2])
        location = ds.get("SliceLocation")
        return float(location) if location is not None else None
    except (TypeError, ValueError):
        return None


def read_header(path: Path) -> dict[str, Any]:
    """One file's index row (its ``status`` says whether it is a usable image)."""
    stat = Path(path).stat()
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
    row.update(path=str(path), size=size, mtime_ns=mtime_ns)
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
        return decode.NO_PIXELS
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


def _pixel_status(ds: pydicom.Dataset, path: Path, offset: int, size: int) -> str:
    """Check that a pixel data element follows the header and fits in the file."""
    little = True
    implicit = False
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is not None:
        try:
            little, implicit = ts.is_little_endian, ts.is_implicit_VR
        except (AttributeError, ValueError):
            pass
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
