"""Index a site's DICOM folders by Study/Series/SOP Instance UID, incrementally.

Only headers are read (``stop_before_pixels``). The index is cached as Parquet in
the site's cache folder; the next call re-reads only files that are new or whose
size or modification time changed, and drops files that are gone. Files that are
not usable DICOM images stay in the index with a ``status`` saying why, so a site
check can report them; they never stop the indexing.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.errors import InvalidDicomError

from ...common.errors import DataError

logger = logging.getLogger(__name__)

INDEX_FILE = "dicom-index.parquet"
OK = "ok"

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
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("status", pa.string()),
    ]
)

_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}


def index_dicom(folders: list[Path], cache_dir: Path) -> pa.Table:
    """Index every file under ``folders``; return the index table sorted by path.

    Re-uses ``cache_dir/dicom-index.parquet`` for files whose size and mtime are
    unchanged. A missing folder raises :class:`DataError`.
    """
    folders = [Path(f) for f in folders]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise DataError(
            "DICOM folder(s) not found: " + ", ".join(str(f) for f in missing),
            hint="Fix `data.dicom-dirs` in site.toml (paths relative to site.toml).",
        )
    cache_dir = Path(cache_dir)
    cached = _load_cache(cache_dir / INDEX_FILE)
    rows: list[dict[str, Any]] = []
    n_read = 0
    for path, stat in _walk(folders, skip=cache_dir):
        key = str(path)
        old = cached.get(key)
        if (
            old is not None
            and old["size"] == stat.st_size
            and old["mtime_ns"] == stat.st_mtime_ns
        ):
            rows.append(old)
            continue
        rows.append(_read_header(path, stat.st_size, stat.st_mtime_ns))
        n_read += 1
    rows.sort(key=lambda r: r["path"])
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    n_gone = len(set(cached) - {r["path"] for r in rows})
    if n_read or n_gone or not (cache_dir / INDEX_FILE).is_file():
        _save_cache(table, cache_dir)
    n_ok = sum(1 for r in rows if r["status"] == OK)
    logger.info(
        "DICOM index: %d files (%d usable), %d read, %d from cache, %d removed",
        len(rows),
        n_ok,
        n_read,
        len(rows) - n_read,
        n_gone,
    )
    return table


def _walk(folders: list[Path], *, skip: Path) -> list[tuple[Path, os.stat_result]]:
    skip_resolved = skip.resolve()
    seen: set[Path] = set()
    found = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            dirnames[:] = sorted(
                d for d in dirnames if (here / d).resolve() != skip_resolved
            )
            for name in sorted(filenames):
                path = (here / name).resolve()
                if path in seen or not path.is_file():
                    continue
                seen.add(path)
                found.append((path, path.stat()))
    return found


def _load_cache(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        logger.warning(
            "DICOM index cache %s is unreadable (%s); rebuilding it", path, exc
        )
        return {}
    if table.schema != INDEX_SCHEMA:
        logger.info("DICOM index cache %s has an old layout; rebuilding it", path)
        return {}
    return {row["path"]: row for row in table.to_pylist()}


def _save_cache(table: pa.Table, cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{INDEX_FILE}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, cache_dir / INDEX_FILE)


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def _read_header(path: Path, size: int, mtime_ns: int) -> dict[str, Any]:
    """Read one file's header into an index row; never raises for bad files."""
    row: dict[str, Any] = {name: None for name in INDEX_SCHEMA.names}
    row.update(path=str(path), size=size, mtime_ns=mtime_ns)
    try:
        with path.open("rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True)
            pixel_offset = handle.tell()
    except InvalidDicomError:
        row["status"] = "not DICOM: no DICM preamble (not a DICOM Part 10 file)"
        return row
    except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded, not fatal
        row["status"] = f"unreadable header: {type(exc).__name__}"
        return row
    meta = getattr(ds, "file_meta", None)
    row.update(
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        transfer_syntax=_text(meta, "TransferSyntaxUID") if meta is not None else None,
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
    )
    row["status"] = _status(ds, row, path, pixel_offset, size)
    return row


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _status(
    ds: pydicom.Dataset, row: dict[str, Any], path: Path, offset: int, size: int
) -> str:
    if not row["study_uid"]:
        return "no StudyInstanceUID"
    if not row["sop_uid"]:
        return "no SOPInstanceUID"
    if not row["rows"] or not row["columns"]:
        return "no image (Rows/Columns missing)"
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
        return "no pixel data (file ends after the header, truncated?)"
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    if (group, elem) not in _PIXEL_TAGS:
        return "no pixel data element"
    if implicit:
        (length,) = struct.unpack(end + "L", head[4:8])
        start = offset + 8
    else:
        if len(head) < 12:
            return "truncated pixel data"
        (length,) = struct.unpack(end + "L", head[8:12])
        start = offset + 12
    if length != _UNDEFINED_LENGTH and start + length > size:
        present = max(size - start, 0)
        return f"truncated pixel data: {length} bytes declared, {present} present"
    return OK
