"""Read a site's EHR table through its declared schema and encode it, streamed.

The run's :class:`TaskConfig` names features and labels and fixes their units,
plausible ranges, categorical vocabularies and normalisation. ``[ehr]``,
``[ehr.features]`` and ``[ehr.labels]`` in ``site.toml`` say which of the site's
columns hold them, with the site's types, units, allowed ranges and value
mappings. Every schema problem is reported at once, before a row is read. The
rows are read in record batches from the site's source (a Parquet table or its
database, :mod:`.ehr_source`), only declared columns.
The encoded EHR vector has the layout of ``TaskConfig.ehr_width``::

    [numeric values in the run's unit, normalised with the run's mean/std;
     missing or out of range -> 0 (the run's mean: mean imputation)]
    [one missingness flag per numeric feature (1 = missing or out of range)]
    [per categorical feature: one-hot over the run's vocabulary, then an
     'unknown' slot (missing or outside the vocabulary)]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..common.config import TaskConfig, TaskKind
from ..common.errors import DataError
from .ehr_source import EhrSource, as_source
from .site_config import ColumnType, EhrSchema, FeatureSpec, LabelSpec
from .units import conversion, known_units

BATCH_ROWS = 65_536


def _columns(task: TaskConfig, schema: EhrSchema) -> list[str]:
    names = [schema.patient_id, schema.study_uid]
    if schema.note:
        names.append(schema.note)
    features = [f for f in (*task.numeric, *task.categorical) if schema.records(f)]
    names += [schema.feature_column(f) for f in features]
    names += [
        unit
        for f in task.numeric
        if schema.records(f)
        and (unit := schema.feature_spec(f).unit_column) is not None
    ]
    names += [schema.label_column(x) for x in task.labels if schema.records(x)]
    return list(dict.fromkeys(names))


def _kind(dtype: pa.DataType) -> ColumnType | None:
    if pa.types.is_boolean(dtype):
        return ColumnType.BOOLEAN
    if pa.types.is_integer(dtype):
        return ColumnType.INTEGER
    if pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return ColumnType.NUMBER
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return ColumnType.TEXT
    if pa.types.is_dictionary(dtype):
        return _kind(dtype.value_type)
    return None


_NUMERIC = {ColumnType.NUMBER, ColumnType.INTEGER, ColumnType.BOOLEAN}


def schema_problems(
    arrow_schema: pa.Schema, task: TaskConfig, schema: EhrSchema
) -> list[str]:
    """Every problem of the table's schema against the declaration, at once."""
    return _problems_and_missing(arrow_schema, task, schema)[0]


def _problems_and_missing(
    arrow_schema: pa.Schema, task: TaskConfig, schema: EhrSchema
) -> tuple[list[str], int]:
    check = _SchemaCheck({f.name: f.type for f in arrow_schema}, schema.from_omop)
    check.column(schema.patient_id, "patient id", "[ehr] patient-id")
    check.column(
        schema.study_uid, "study uid, joins DICOM StudyInstanceUID", "[ehr] study-uid"
    )
    if schema.note and "note" in schema.model_fields_set:
        dtype = check.column(schema.note, "free-text note", "[ehr] note")
        # null: a column empty in every row (no study has a note)
        if (
            dtype is not None
            and not pa.types.is_null(dtype)
            and _kind(dtype) is not ColumnType.TEXT
        ):
            check.problems.append(
                f"  - note column {schema.note!r} holds {dtype}, not text"
            )
    for name in task.numeric:
        if schema.records(name):
            spec = schema.feature_spec(name)
            check.numeric_feature(name, spec, task.units.get(name))
    for name, vocab in task.categorical.items():
        if schema.records(name):
            check.categorical_feature(name, schema.feature_spec(name), vocab)
    for name in task.labels:
        if schema.records(name):
            check.label(name, schema.label_spec(name))
    return check.problems, len(set(check.absent))


class _SchemaCheck:
    """The EHR table's columns against site.toml's schema and the run's task."""

    def __init__(self, have: dict[str, pa.DataType], omop: bool = False) -> None:
        self.have = have
        self.omop = omop  # the OMOP preset's query: its mapping is elsewhere
        self.problems: list[str] = []
        self.absent: list[str] = []

    def column(
        self, name: str, what: str, key: str, run_name: str | None = None
    ) -> pa.DataType | None:
        """The column's type, or None (a problem) when the table lacks it.

        ``run_name``: the run feature or label this column holds (it may then be
        declared not recorded instead).
        """
        if name not in self.have:
            self.absent.append(name)
            if run_name is not None and self.omop:
                fix = (
                    f"map {run_name} under [data.ehr-database.omop."
                    f"{'labels' if key.startswith('[ehr.labels]') else 'features'}] "
                    f'in site.toml, or add "{run_name}" to [data.ehr-database.omop] '
                    "not-recorded if this site does not record it"
                )
            else:
                fix = f'set `{key} = "<column>"` in site.toml'
                if run_name is not None:
                    fix += (
                        f', or add "{run_name}" to `[ehr] not-recorded` if this '
                        "site does not record it"
                    )
            self.problems.append(f"  - {name!r} ({what}): {fix}")
            return None
        return self.have[name]

    def declared(self, name: str, dtype: pa.DataType, want: ColumnType | None) -> None:
        """A problem when the column's type is not the one site.toml declares."""
        kind = _kind(dtype)
        if (
            want is not None
            and kind is not want
            and not (want is ColumnType.NUMBER and kind is ColumnType.INTEGER)
        ):
            self.problems.append(
                f"  - column {name!r} is declared {want.value} but holds {dtype}"
            )

    def numeric_feature(
        self, name: str, spec: FeatureSpec, run_unit: str | None
    ) -> None:
        """A numeric feature: a numeric column, a convertible unit, no ``map``."""
        dtype = self.column(
            spec.column, f"feature {name}", f"[ehr.features] {name}", name
        )
        # a column that is null in every row (a test this site never runs) has
        # Arrow type null: it is a feature missing everywhere, not a wrong type
        if dtype is not None and not pa.types.is_null(dtype):
            self.declared(spec.column, dtype, spec.type)
            if _kind(dtype) not in _NUMERIC:
                self.problems.append(
                    f"  - column {spec.column!r} (feature {name}) holds {dtype}; "
                    "it must be numeric: write it as numbers (a value like "
                    "'5.5 mg/L' as 5.5, with `unit` declared for the feature)"
                )
        if spec.unit_column is not None:
            unit_type = self.column(
                spec.unit_column,
                f"unit of feature {name}",
                f"[ehr.features] {name} unit-column",
            )
            if (
                unit_type is not None
                and not pa.types.is_null(unit_type)  # empty: no value needs a unit
                and _kind(unit_type) is not ColumnType.TEXT
            ):
                self.problems.append(
                    f"  - unit column {spec.unit_column!r} (feature {name}) holds "
                    f"{unit_type}, not text"
                )
            if run_unit is None:
                self.problems.append(
                    f"  - [ehr.features] {name}: unit-column declared but the run "
                    "declares no unit for it (task.units)"
                )
        if spec.unit is not None:
            if run_unit is None:
                self.problems.append(
                    f"  - [ehr.features] {name}: unit {spec.unit!r} declared but the "
                    "run declares no unit for it (task.units)"
                )
            elif conversion(spec.unit, run_unit) is None:
                self.problems.append(
                    f"  - [ehr.features] {name}: unit {spec.unit!r} cannot be converted "
                    f"to the run's {run_unit!r}; known: {', '.join(known_units(run_unit))}"
                )
        if spec.map:
            self.problems.append(
                f"  - [ehr.features] {name}: `map` is for categorical features"
            )

    def categorical_feature(
        self, name: str, spec: FeatureSpec, vocab: tuple[str, ...]
    ) -> None:
        """A categorical feature: text or integer codes mapped into the vocabulary."""
        dtype = self.column(
            spec.column, f"feature {name}", f"[ehr.features] {name}", name
        )
        if dtype is not None and not pa.types.is_null(
            dtype
        ):  # null: missing everywhere
            self.declared(spec.column, dtype, spec.type)
            if _kind(dtype) not in (
                ColumnType.TEXT,
                ColumnType.INTEGER,
                ColumnType.BOOLEAN,
            ):
                self.problems.append(
                    f"  - column {spec.column!r} (feature {name}) holds {dtype}; "
                    "it must be text or integer codes"
                )
        bad = sorted({v for v in spec.map.values() if v not in vocab})
        if bad:
            self.problems.append(
                f"  - [ehr.features] {name}: map targets {bad} are not in the run's "
                f"vocabulary {list(vocab)}"
            )
        if spec.unit is not None or spec.range is not None:
            self.problems.append(
                f"  - [ehr.features] {name}: unit/range are for numeric features"
            )

    def label(self, name: str, spec: LabelSpec) -> None:
        """A label column: numeric or boolean, or text with its positive values."""
        dtype = self.column(spec.column, f"label {name}", f"[ehr.labels] {name}", name)
        if dtype is None or pa.types.is_null(dtype):  # null: unknown in every row
            return
        self.declared(spec.column, dtype, spec.type)
        kind = _kind(dtype)
        mapped = bool(spec.positive or spec.negative)
        if kind is ColumnType.BOOLEAN and mapped:
            odd = [v for v in (*spec.positive, *spec.negative) if _as_bool(v) is None]
            if odd:
                self.problems.append(
                    f"  - label column {spec.column!r} ({name}) holds true/false, and "
                    f"[ehr.labels.{name}] names {odd}: name true or false (e.g. "
                    'positive = ["false"] for a column that is true when normal), '
                    "or leave the mapping out (true is positive)"
                )
        elif kind is ColumnType.TEXT and not (spec.positive and spec.negative):
            # a text value in neither list is unknown: with no negative list every
            # finding would be unknown, and reading the rest as negatives would
            # count 'uncertain' or 'not assessed' as a negative finding
            self.problems.append(
                f"  - label column {spec.column!r} ({name}) holds text: "
                f"declare both `positive = [...]` and `negative = [...]` under "
                f"[ehr.labels.{name}] (a value in neither list is unknown, never "
                "a negative)"
            )
        elif (
            kind in (ColumnType.INTEGER, ColumnType.NUMBER)
            and mapped
            and not _as_numbers({*spec.positive, *spec.negative})
        ):
            words = [v for v in (*spec.positive, *spec.negative) if not _is_number(v)]
            self.problems.append(
                f"  - label column {spec.column!r} ({name}) holds numeric codes, "
                f"and [ehr.labels.{name}] names {words}: name the codes instead "
                '(e.g. positive = ["1"], negative = ["0"])'
            )
        elif kind is None:
            self.problems.append(
                f"  - label column {spec.column!r} ({name}) holds {dtype}"
            )


def declared_columns(task: TaskConfig, schema: EhrSchema) -> list[str]:
    """Every column a run of ``task`` may read (a query may return only these)."""
    names = _columns(task, schema)
    if task.kind is TaskKind.REPORT:
        names.append(schema.report)
    elif task.kind is TaskKind.VQA:
        names += [schema.question, schema.answer]
    return list(dict.fromkeys(names))


def open_ehr(
    source: EhrSource | Path, task: TaskConfig, schema: EhrSchema
) -> tuple[EhrSource, list[str]]:
    """Check the EHR source's schema; return the source and the columns to read.

    Reads no rows. Raises :class:`DataError` listing every problem at once (and
    :class:`SourceUnreachable` when a database cannot be reached).
    """
    source = as_source(source)
    arrow_schema = source.arrow_schema()
    problems, n_missing = _problems_and_missing(arrow_schema, task, schema)
    if source.only_declared:
        allowed = set(declared_columns(task, schema))
        extra = [n for n in arrow_schema.names if n not in allowed]
        repeated = sorted(
            {n for n in arrow_schema.names if arrow_schema.names.count(n) > 1}
        )
        if extra:
            problems.append(
                f"  - the query returns {len(extra)} undeclared column(s): "
                + ", ".join(repr(n) for n in extra)
                + "; select only the columns declared under [ehr]"
            )
        if repeated:
            problems.append(
                f"  - the query returns column(s) {repeated} more than once"
            )
    if problems:
        raise DataError(
            f"{source.label} has {len(problems)} schema problem(s) "
            f"({n_missing} declared column(s) missing):\n"
            + "\n".join(problems)
            + "\nThe table has columns: "
            + ", ".join(sorted(arrow_schema.names)),
            hint="Map the run's names to your columns in site.toml under [ehr], "
            "[ehr.features] and [ehr.labels] (with type, unit, range, map, positive, "
            "negative).",
        )
    have = set(arrow_schema.names)
    return source, [c for c in _columns(task, schema) if c in have]


def read_ehr(source: EhrSource | Path, task: TaskConfig, schema: EhrSchema) -> pa.Table:
    """Read only the declared columns (whole table; see :func:`iter_ehr` to stream)."""
    opened, wanted = open_ehr(source, task, schema)
    batches = list(opened.batches(wanted, BATCH_ROWS))
    if not batches:
        arrow_schema = opened.arrow_schema()
        return pa.schema([arrow_schema.field(c) for c in wanted]).empty_table()
    return pa.Table.from_batches(batches)


def iter_ehr(
    source: EhrSource | Path,
    task: TaskConfig,
    schema: EhrSchema,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Stream the declared columns in record batches."""
    opened, wanted = open_ehr(source, task, schema)
    yield from opened.batches(wanted, batch_rows)


@dataclass
class EhrStats:
    """Counts about the values (never the values): for `site check`."""

    rows: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    out_of_range: dict[str, int] = field(default_factory=dict)
    unknown_category: dict[str, int] = field(default_factory=dict)
    label_null: dict[str, int] = field(default_factory=dict)
    label_positive: dict[str, int] = field(default_factory=dict)
    label_unmapped: dict[str, int] = field(default_factory=dict)
    unit_unknown: dict[str, int] = field(default_factory=dict)
    """Per feature with a unit column: values whose unit cannot be converted."""

    def add(self, counts: dict[str, int], key: str, n: int) -> None:
        """Add ``n`` to ``counts[key]``."""
        counts[key] = counts.get(key, 0) + int(n)


class EncodedEhr(NamedTuple):
    """The EHR rows as arrays, in the table's row order."""

    features: np.ndarray  # float32 [n, task.ehr_width]
    labels: np.ndarray  # float32 [n, len(task.labels)], null -> 0
    notes: list[str]  # "" where absent
    patient_ids: list[str | None]
    study_uids: list[str | None]
    label_null: np.ndarray  # bool [n, len(task.labels)]: the cell was null
    stats: EhrStats | None = None

    @property
    def null_labels(self) -> int:
        """How many label cells were null or unmapped (left out of loss and AUROC)."""
        return int(self.label_null.sum())


def _floats(array: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if _kind(array.type) not in _NUMERIC:
        return np.full(len(array), np.nan)
    cast = pc.cast(array, pa.float64())
    return cast.to_numpy(zero_copy_only=False).astype(np.float64)


def _texts(array: pa.ChunkedArray | pa.Array) -> list[str | None]:
    return pc.cast(array, pa.string()).to_pylist()


def record_keys(array: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """Patient ids or study UIDs without surrounding whitespace (None if blank).

    Exports pad identifiers with spaces; ``" 0123"`` and ``"0123"`` are one patient.
    """
    keys: list[str | None] = []
    for text in _texts(array):
        key = text.strip() if text is not None else None
        keys.append(key or None)
    return keys


def encode_batch(
    table: pa.Table | pa.RecordBatch,
    task: TaskConfig,
    schema: EhrSchema,
    stats: EhrStats,
) -> EncodedEhr:
    """Encode one batch (see module docstring); counts go into ``stats``."""
    n = table.num_rows
    stats.rows += n

    def column(name: str, column_name: str) -> pa.ChunkedArray | pa.Array:
        # a feature or label the site does not record is null in every row
        return table.column(column_name) if schema.records(name) else pa.nulls(n)

    numeric = np.zeros((n, len(task.numeric)), np.float32)
    missing = np.zeros((n, len(task.numeric)), np.float32)
    for j, (name, norm) in enumerate(task.numeric.items()):
        spec = schema.feature_spec(name)
        values = _floats(column(name, spec.column))
        absent = ~np.isfinite(values)
        outside = np.zeros(n, bool)
        if spec.range is not None:
            outside |= ~absent & ((values < spec.range[0]) | (values > spec.range[1]))
        run_unit = task.units.get(name)
        if (
            spec.unit_column is not None
            and run_unit is not None
            and schema.records(name)
        ):
            scale, offset = _row_conversions(table.column(spec.unit_column), run_unit)
            unknown = ~absent & np.isnan(scale)
            stats.add(stats.unit_unknown, name, unknown.sum())
            absent |= unknown
            values = values * scale + offset
        elif spec.unit is not None and run_unit is not None:
            scale_1, offset_1 = conversion(spec.unit, run_unit) or (1.0, 0.0)
            values = values * scale_1 + offset_1
        if name in task.ranges:
            low, high = task.ranges[name]
            outside |= ~absent & ((values < low) | (values > high))
        stats.add(stats.missing, name, absent.sum())
        stats.add(stats.out_of_range, name, outside.sum())
        gone = absent | outside
        numeric[:, j] = np.where(gone, 0.0, (values - norm.mean) / norm.std)
        missing[:, j] = gone
    onehots = []
    for name, vocab in task.categorical.items():
        spec = schema.feature_spec(name)
        texts = _texts(column(name, spec.column))
        slot = {v: i for i, v in enumerate(vocab)}
        slot.update({k: slot[v] for k, v in spec.map.items() if v in slot})
        index = np.array(
            [slot.get(t.strip(), len(vocab)) if t is not None else -1 for t in texts],
            np.int64,
        )
        stats.add(stats.missing, name, (index < 0).sum())
        stats.add(stats.unknown_category, name, (index == len(vocab)).sum())
        block = np.zeros((n, len(vocab) + 1), np.float32)
        block[np.arange(n), np.where(index < 0, len(vocab), index)] = 1.0
        onehots.append(block)
    labels = np.zeros((n, len(task.labels)), np.float32)
    label_null = np.zeros((n, len(task.labels)), bool)
    for k, name in enumerate(task.labels):
        label_spec = schema.label_spec(name)
        cells = column(name, label_spec.column)
        values = _label_values(cells, label_spec.positive, label_spec.negative)
        null = np.isnan(values)
        unmapped = int(null.sum()) - cells.null_count
        label_null[:, k] = null
        labels[:, k] = np.where(null, 0.0, values != 0)
        stats.add(stats.label_null, name, null.sum())
        stats.add(stats.label_unmapped, name, unmapped)
        stats.add(stats.label_positive, name, labels[:, k].sum())
    note = schema.note
    if note and note in table.column_names:
        notes = [t or "" for t in _texts(table.column(note))]
    else:
        notes = [""] * n
    features = np.concatenate([numeric, missing, *onehots], axis=1).astype(np.float32)
    return EncodedEhr(
        features=features,
        labels=labels,
        notes=notes,
        patient_ids=record_keys(table.column(schema.patient_id)),
        study_uids=record_keys(table.column(schema.study_uid)),
        label_null=label_null,
        stats=stats,
    )


def _row_conversions(
    units: pa.ChunkedArray | pa.Array, run_unit: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``(scale, offset)`` to the run's unit; NaN where the unit is unknown."""
    coded = pc.dictionary_encode(pc.cast(units, pa.string()))
    if isinstance(coded, pa.ChunkedArray):
        coded = coded.combine_chunks()
    table = [conversion(u, run_unit) for u in coded.dictionary.to_pylist()]
    scales = np.array([c[0] if c else np.nan for c in table] + [np.nan])
    offsets = np.array([c[1] if c else np.nan for c in table] + [np.nan])
    # null units index the extra NaN slot
    index = pc.fill_null(coded.indices, len(table)).to_numpy(zero_copy_only=False)
    return scales[index], offsets[index]


def _as_bool(value: str) -> bool | None:
    """A boolean label value as site.toml may write it (true/false, 1/0), else None."""
    return {"true": True, "1": True, "false": False, "0": False}.get(
        value.strip().lower()
    )


def _is_number(value: str) -> bool:
    return bool(_as_numbers({value}))


def _as_numbers(values: set[str]) -> dict[str, float]:
    """Each declared label value as a number; empty if any is not one."""
    try:
        return {v: float(v) for v in values}
    except ValueError:
        return {}


def _label_values(
    array: pa.ChunkedArray | pa.Array,
    positive: tuple[str, ...],
    negative: tuple[str, ...],
) -> np.ndarray:
    """1.0 / 0.0 per row, NaN for null or (with a mapping) unmapped values."""
    if _kind(array.type) is ColumnType.BOOLEAN and (positive or negative):
        # one list names the other value too: a boolean has no third value
        said = [b for b in map(_as_bool, positive) if b is not None]
        unsaid = [not b for b in map(_as_bool, negative) if b is not None]
        means_positive = said or unsaid  # the schema check refused other words
        values = _floats(array)  # 1.0 / 0.0 / NaN for null
        known = ~np.isnan(values)
        out = np.full(len(array), np.nan)
        out[known] = np.isin(values[known] == 1.0, means_positive).astype(float)
        return out
    if not positive and _kind(array.type) in _NUMERIC:
        values = _floats(array)
        # without a declared mapping a numeric label is 0 or 1: another code (-1 for
        # uncertain, 2 for a second class) is unmapped, never silently positive
        values[(values != 0.0) & (values != 1.0)] = np.nan
        return values
    pos = {p.strip().lower() for p in positive}
    neg = {v.strip().lower() for v in negative}
    out = np.full(len(array), np.nan)
    numbers = _as_numbers(pos | neg)
    if _kind(array.type) in (ColumnType.INTEGER, ColumnType.NUMBER) and numbers:
        # a code is read as a number ("1" names 1.0 too); with only `positive`
        # declared, 0 is the negative and another code (-1, 2) is unmapped
        values = _floats(array)
        out[np.isin(values, [numbers[v] for v in pos])] = 1.0
        negatives = [numbers[v] for v in neg] if neg else [0.0]
        out[np.isnan(out) & np.isin(values, negatives)] = 0.0
        return out
    for i, text in enumerate(_texts(array)):
        if text is None:
            continue
        key = text.strip().lower()
        if key in pos:
            out[i] = 1.0
        elif key in neg:
            out[i] = 0.0
    return out


def encode_ehr(table: pa.Table, task: TaskConfig, schema: EhrSchema) -> EncodedEhr:
    """Encode a whole table at once; raise DataError on schema problems."""
    problems = schema_problems(table.schema, task, schema)
    if problems:
        raise DataError(
            f"EHR columns with problems ({len(problems)}):\n" + "\n".join(problems),
            hint="Convert these columns, or declare type/unit/positive in site.toml.",
        )
    return encode_batch(table, task, schema, EhrStats())


def read_encoded_ehr(
    source: EhrSource | Path,
    task: TaskConfig,
    schema: EhrSchema,
    batch_rows: int = BATCH_ROWS,
) -> EncodedEhr:
    """Stream, check and encode the EHR table; counts in ``.stats``."""
    stats = EhrStats()
    parts = [
        encode_batch(b, task, schema, stats)
        for b in iter_ehr(source, task, schema, batch_rows)
    ]
    if not parts:
        width, n_labels = task.ehr_width, len(task.labels)
        return EncodedEhr(
            np.zeros((0, width), np.float32),
            np.zeros((0, n_labels), np.float32),
            [],
            [],
            [],
            np.zeros((0, n_labels), bool),
            stats,
        )
    return EncodedEhr(
        features=np.concatenate([p.features for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        notes=[t for p in parts for t in p.notes],
        patient_ids=[t for p in parts for t in p.patient_ids],
        study_uids=[t for p in parts for t in p.study_uids],
        label_null=np.concatenate([p.label_null for p in parts]),
        stats=stats,
    )
