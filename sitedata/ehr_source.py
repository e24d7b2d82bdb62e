"""Where a site's EHR rows come from: a Parquet file or folder, or its database.

Both sources give the same two things: the Arrow schema of the rows (read
without reading a row, so every schema problem is reported before any value is
used) and the rows as Arrow record batches of the requested columns (streamed:
never the whole table in memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa
import pyarrow.dataset as pads

from ..common.errors import DataError

if TYPE_CHECKING:
    from .site_config import SiteConfig


class EhrSource(Protocol):
    """The EHR rows of a site, wherever they live."""

    @property
    def label(self) -> str:
        """How messages name the rows (never with a secret)."""
        ...

    @property
    def fix_hint(self) -> str:
        """What to change in site.toml when the source cannot be opened."""
        ...

    @property
    def only_declared(self) -> bool:
        """True: every column the source returns must be declared (a query)."""
        ...

    def arrow_schema(self) -> pa.Schema:
        """The columns and their types; reads no row."""
        ...

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The rows, only ``columns``, in record batches of at most ``batch_rows``."""
        ...


class ParquetEhr:
    """A Parquet file, or a folder of them (hive partitions allowed)."""

    only_declared = False
    fix_hint = (
        "Point `data.ehr` in site.toml at a Parquet file or folder (relative to "
        "site.toml), or name the database under [data.ehr-database]."
    )

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._dataset: pads.Dataset | None = None

    @property
    def label(self) -> str:
        """``EHR table <path>``."""
        return f"EHR table {self.path}"

    def dataset(self) -> pads.Dataset:
        """The opened dataset, or a DataError saying why it cannot be opened."""
        if self._dataset is None:
            self._dataset = open_dataset(self.path)
        return self._dataset

    def arrow_schema(self) -> pa.Schema:
        """The dataset's schema (reads only the Parquet footers)."""
        return self.dataset().schema

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The declared columns, in file order, one file after another.

        The schema is the first file's; a later file that is not Parquet, or whose
        values cannot be read as that schema's types, is a DataError naming it.
        """
        dataset = self.dataset()
        for fragment in dataset.get_fragments():
            scanner = pads.Scanner.from_fragment(
                fragment, schema=dataset.schema, columns=columns, batch_size=batch_rows
            )
            try:
                yield from scanner.to_batches()
            except PermissionError as exc:
                raise _no_permission(self.path, exc) from None
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
                raise _unreadable_file(self.path, fragment.path, exc) from None


def open_dataset(path: Path) -> pads.Dataset:
    """Open a Parquet file or partitioned folder, or raise a DataError saying why."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"EHR table {path} not found",
            hint="Fix `data.ehr` in site.toml (a Parquet file or a folder of them, "
            "relative to site.toml).",
        )
    try:
        dataset = pads.dataset(path, format="parquet", partitioning="hive")
        typed = _typed_where_first_file_is_empty(dataset)
        if typed is not None:
            dataset = pads.dataset(
                path, format="parquet", partitioning="hive", schema=typed
            )
        return dataset
    except PermissionError as exc:
        raise _no_permission(path, exc) from None
    except (pa.ArrowInvalid, OSError) as exc:
        bad = _first_unreadable(path) if path.is_dir() else None
        if bad is not None:
            raise _unreadable_file(path, str(bad), exc) from None
        hint = "Point `data.ehr` in site.toml at a Parquet file or folder."
        name = path.name.lower()
        if name.endswith((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz")):
            stem = path.name.split(".")[0]
            hint = (
                "wardround reads Parquet, which keeps each column's type; convert "
                "the export once, reading the id columns as text (a guessed type "
                "turns '000123' into 123), e.g. python -c \"import pyarrow as pa, "
                "pyarrow.csv as c, pyarrow.parquet as p; t = c.read_csv("
                f"'{path.name}', convert_options=c.ConvertOptions(column_types="
                "{'patient_id': pa.string(), 'study_uid': pa.string()})); "
                f"p.write_table(t, '{stem}.parquet')\" (with your id column names), "
                "check the column types `site check` shows, and point `data.ehr` at "
                "the Parquet file."
            )
        raise DataError(
            f"EHR table {path} is not readable Parquet ({type(exc).__name__})",
            hint=hint,
        ) from None


def _typed_where_first_file_is_empty(dataset: pads.Dataset) -> pa.Schema | None:
    """The folder's schema with the type of a column the first file has empty.

    A column null in every row of a file has Arrow type null there (a month in
    which no BNP was measured); as the folder's schema it would refuse the files
    that hold numbers. Its type is then the one that holds every other file's
    (int64 and float64: float64). None: no change.
    """
    schema = dataset.schema
    empty = {f.name for f in schema if pa.types.is_null(f.type)}
    if not empty:
        return None
    found: dict[str, pa.DataType] = {}
    for fragment in dataset.get_fragments():
        for field in fragment.physical_schema:
            if field.name not in empty or pa.types.is_null(field.type):
                continue
            if field.name not in found:
                found[field.name] = field.type
                continue
            # int64 in one month, float64 (5.5) in the next: the type that holds both
            try:
                merged = pa.unify_schemas(
                    [
                        pa.schema([pa.field(field.name, found[field.name])]),
                        pa.schema([field]),
                    ],
                    promote_options="permissive",
                )
                found[field.name] = merged.field(field.name).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass  # types that do not merge: the file that differs is named on read
    if not found:
        return None
    return pa.schema(
        [f.with_type(found[f.name]) if f.name in found else f for f in schema],
        metadata=schema.metadata,
    )


def _first_unreadable(folder: Path) -> Path | None:
    """The first file under ``folder`` (in path order) whose Parquet footer is unreadable.

    Hidden and ``_``-prefixed names are skipped, as pyarrow skips them.
    """
    import pyarrow.parquet as pq

    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder).parts
        if not file.is_file() or any(p.startswith((".", "_")) for p in relative):
            continue
        try:
            pq.read_schema(file)
        except (pa.ArrowInvalid, OSError):
            return file
    return None


def _no_permission(table: Path, exc: PermissionError) -> DataError:
    """The account may not read the table (or a file or folder of it)."""
    import getpass

    where = exc.filename or table
    return DataError(
        f"EHR table {table}: the account running wardround ({getpass.getuser()}) may "
        f"not read {where}",
        hint="Give that account read access (e.g. through a group), or run wardround "
        "as an account that has it.",
    )


def _unreadable_file(table: Path, file: str, exc: Exception) -> DataError:
    """A DataError naming the file of an EHR folder that cannot be read.

    Arrow's own message is left out: it can quote a cell's value.
    """
    import pyarrow.parquet as pq

    name = Path(file).name
    try:
        pq.read_schema(file)
        why = (
            "a column holds values of another type than in the folder's first file, "
            "e.g. text with units where numbers are expected"
        )
    except (pa.ArrowInvalid, OSError):
        why = "it is not a Parquet file"
    return DataError(
        f"EHR table {table}: file {file} cannot be read with the folder's columns "
        f"({why}; {type(exc).__name__})",
        hint=f"Every file of an EHR folder must be Parquet with the same columns and "
        f"types: move {name} out of the folder, or rewrite it with the first file's "
        "types.",
    )


def as_source(source: EhrSource | Path | str) -> EhrSource:
    """A path is a Parquet source; a source is itself."""
    if isinstance(source, (str, Path)):
        return ParquetEhr(Path(source))
    return source


def ehr_source(site: SiteConfig) -> EhrSource:
    """The site's EHR source: ``[data.ehr-database]`` when set, else ``data.ehr``."""
    database = site.data.ehr_database
    if database is None:
        return ParquetEhr(site.ehr_path)
    from .ehr_sql import DatabaseEhr  # the database driver loads only when named

    return DatabaseEhr(database, site.base_dir, site.ehr)
