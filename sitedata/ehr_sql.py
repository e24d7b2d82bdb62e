"""The site's EHR read from PostgreSQL through ADBC, as Arrow record batches.

ADBC's PostgreSQL driver reads with ``COPY ... TO STDOUT (FORMAT binary)`` and
hands back Arrow batches: no Python object per row, and the client holds one
batch at a time, so the database is never loaded into memory. Rows are ordered
by study UID and patient id, so two reads of the same data give the same
dataset. Every transaction of the session is read-only
(``default_transaction_read_only``, set when the connection opens), even when
the account would allow more.

Errors name the database (``postgresql://user@host:port/db``) and the reason,
never the password: libpq does not echo it, and every message is scrubbed of it
anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc

from ..common.errors import DataError, SourceUnreachable
from .ehr_database_config import EhrDatabaseSection, quote_identifier, quote_table
from .omop import omop_query
from .secrets import LOOPBACK_HOSTS, read_secret, url_with_password
from .site_config import EhrSchema

logger = logging.getLogger(__name__)

_SETTING = "[data.ehr-database]"


class DatabaseEhr:
    """EHR rows from one table, view or query of the site's PostgreSQL."""

    def __init__(
        self, section: EhrDatabaseSection, base_dir: Path, schema: EhrSchema
    ) -> None:
        self.section = section
        self.base_dir = base_dir
        self.schema = schema

    @property
    def label(self) -> str:
        """``EHR database postgresql://user@host:port/db (table t)``."""
        return f"EHR database {self.section.where} ({self.section.what})"

    @property
    def only_declared(self) -> bool:
        """A query's columns must all be declared; a table's are selected by name."""
        return self.section.query is not None

    @property
    def fix_hint(self) -> str:
        """What to check when the database cannot be read."""
        return (
            f"Check {_SETTING} in site.toml (url, table or query) and that the "
            "account may SELECT from it."
        )

    def _rows_sql(self) -> str:
        if self.section.table:
            return f"SELECT * FROM {quote_table(self.section.table)}"
        if self.section.omop is not None:
            return omop_query(self.section.omop)
        query = (self.section.query or "").strip().rstrip(";")
        return f"SELECT * FROM ({query}) AS wardround_rows"

    def arrow_schema(self) -> pa.Schema:
        """The columns the rows would have; the database plans the query, no row moves."""
        with self._cursor() as cursor:
            raw = _run(cursor.adbc_execute_schema, self._rows_sql(), self)
        return pa.schema([_plain_field(field) for field in raw])

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Only ``columns``, ordered by study UID then patient id."""
        select = ", ".join(quote_identifier(c) for c in columns)
        order = ", ".join(
            quote_identifier(c)
            for c in (self.schema.study_uid, self.schema.patient_id)
            if c in columns
        )
        sql = f"SELECT {select} FROM ({self._rows_sql()}) AS wardround_ehr"
        if order:
            sql += f" ORDER BY {order}"
        rows = 0
        with self._cursor() as cursor:
            _run(cursor.execute, sql, self)
            reader = _run(cursor.fetch_record_batch, None, self)
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except Exception as exc:  # the driver's errors: name the source
                    raise _readable(exc, self) from None
                batch = _plain_batch(batch)
                for start in range(0, batch.num_rows, batch_rows):
                    rows += min(batch_rows, batch.num_rows - start)
                    yield batch.slice(start, batch_rows)
        logger.info("%d EHR row(s) read from %s", rows, self.label)

    def _uri(self) -> tuple[str, str | None]:
        password = read_secret(self.section, self.base_dir, _SETTING)
        parts = urlsplit(url_with_password(self.section.url, password))
        query = dict(parse_qsl(parts.query))
        query.setdefault("connect_timeout", str(self.section.connect_timeout_s))
        query.setdefault("application_name", "wardround")
        # Never send the password in clear, whatever a server (or an impostor) asks.
        query.setdefault("require_auth", "!password")
        verified = query.get("sslmode") in ("verify-full", "verify-ca")
        if (parts.hostname or "") not in LOOPBACK_HOSTS and not verified:
            logger.warning(
                "%s: the connection is not verified TLS; add "
                "?sslmode=verify-full&sslrootcert=<the database's CA> to the url",
                self.section.where,
            )
        # Every transaction of the session read-only from its first statement,
        # whatever the account may do.
        options = query.get("options", "")
        query["options"] = (options + " -c default_transaction_read_only=on").strip()
        uri = urlunsplit(
            (
                parts.scheme,
                parts.netloc,
                parts.path,
                urlencode(query, quote_via=quote),
                "",
            )
        )
        return uri, password

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        import adbc_driver_postgresql.dbapi as postgresql

        uri, password = self._uri()
        self._secret = password
        try:
            connection = postgresql.connect(uri)
        except Exception as exc:
            raise _unreachable(exc, self) from None
        try:
            cursor = connection.cursor()
            try:
                yield cursor
            finally:
                cursor.close()
        finally:
            connection.close()


def check_database_reachable(source: DatabaseEhr) -> None:
    """Connect and plan the rows' query; raise SourceUnreachable or DataError."""
    source.arrow_schema()


def _run(call: Any, argument: Any, source: DatabaseEhr) -> Any:
    try:
        return call() if argument is None else call(argument)
    except Exception as exc:
        raise _readable(exc, source) from None


def _scrub(text: str, source: DatabaseEhr) -> str:
    secret = getattr(source, "_secret", None)
    if secret:
        text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text.strip()


def _unreachable(exc: Exception, source: DatabaseEhr) -> SourceUnreachable:
    text = _scrub(str(exc), source)
    lowered = text.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        why = "the database refused the credentials"
        hint = (
            f"Check the user in {_SETTING} url and the password in its "
            "password-file or password-env."
        )
    elif "does not exist" in lowered:
        why = "the database or user does not exist"
        hint = f"Check the database name and user in {_SETTING} url."
    elif "connection refused" in lowered or "could not translate host" in lowered:
        why = "no database server answers there"
        hint = "Check host and port in the url, and that the server runs and listens."
    elif "timeout" in lowered:
        why = "the connection timed out"
        hint = "Check host, port and firewall, or raise connect-timeout-s."
    else:
        why = "the connection failed"
        hint = source.fix_hint
    return SourceUnreachable(f"{source.label}: {why} ({_last_line(text)})", hint=hint)


def _readable(exc: Exception, source: DatabaseEhr) -> DataError:
    if isinstance(exc, DataError):
        return exc
    text = _scrub(str(exc), source)
    lowered = text.lower()
    if "closed the connection" in lowered or "terminating connection" in lowered:
        return _unreachable(exc, source)
    return DataError(
        f"{source.label} cannot be read: {_last_line(text)}", hint=source.fix_hint
    )


def _last_line(text: str) -> str:
    """The driver's message without the query echo and without a SQLSTATE tail."""
    first = text.split("\n")[0].strip()
    for prefix in ("IO: ", "NOT_FOUND: ", "INVALID_ARGUMENT: ", "UNKNOWN: "):
        first = first.removeprefix(prefix)
    return first.replace("[libpq] ", "")


def _is_numeric(dtype: pa.DataType) -> bool:
    # ADBC returns PostgreSQL numeric as an opaque extension type over its text
    return isinstance(dtype, pa.OpaqueType) and dtype.type_name == "numeric"


def _plain_field(field: pa.Field) -> pa.Field:
    dtype = pa.float64() if _is_numeric(field.type) else field.type
    return pa.field(field.name, dtype, nullable=field.nullable)


def _plain_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    arrays = []
    for column, field in zip(batch.columns, batch.schema, strict=True):
        if _is_numeric(field.type):
            storage = column.storage
            column = pc.cast(storage, pa.float64())
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
