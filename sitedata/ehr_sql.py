"""The site's EHR read from PostgreSQL through ADBC, as Arrow record batches.

ADBC's PostgreSQL driver reads with ``COPY ... TO STDOUT (FORMAT binary)`` and
hands back Arrow batches: no Python object per row, and the client holds one
batch at a time, so the database is never loaded into memory. Rows are ordered
by study UID and patient id, so two reads of the same data give the same
dataset. Every transaction of the session is read-only
(``default_transaction_read_only``, set when the connection opens), even when
the account would allow more, and no statement runs or waits for a lock longer
than ``query-timeout-s`` (``statement_timeout``, ``lock_timeout``). From a table
only the columns the account may SELECT are planned, and only the declared ones
read, so a column grant that leaves out an ``ssn`` is enough.

Errors name the database (``postgresql://user@host:port/db``) and the reason,
never the password: libpq does not echo it, and every message is scrubbed of it
anyway.
"""

from __future__ import annotations

import logging
import re
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
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
_TLS_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "sslcrldir")
# SQLSTATE lock_not_available: lock_timeout (statement_timeout says so in its text)
_LOCK_NOT_AVAILABLE = "55P03"


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

    def _from_item(self) -> str:
        """What the rows are selected from: the table, or the query as a subquery."""
        if self.section.table:
            return quote_table(self.section.table)
        if self.section.omop is not None:
            return f"({omop_query(self.section.omop)}) AS wardround_rows"
        query = (self.section.query or "").strip().rstrip(";")
        # The newline ends a `-- comment` on the query's last line before the `)`.
        return f"({query}\n) AS wardround_rows"

    def _select_item(self, column: str) -> str:
        # Ids are read as their text form: a uuid, bytea or integer id joins like
        # the text ids of a Parquet table (and ADBC's uuid type is not text).
        quoted = quote_identifier(column)
        if column in (self.schema.patient_id, self.schema.study_uid):
            return f"CAST({quoted} AS text) AS {quoted}"
        return quoted

    def arrow_schema(self) -> pa.Schema:
        """The columns the rows would have; the database plans the query, no row moves.

        From a table, only the columns the account may SELECT: a role denied one
        column (an ``ssn``) still reads the others.
        """
        with self._cursor() as cursor:
            columns = self._readable_columns(cursor) if self.section.table else []
            # No readable column (no such table, no grant): `*` lets PostgreSQL
            # name the problem.
            select = ", ".join(quote_identifier(c) for c in columns) or "*"
            sql = f"SELECT {select} FROM {self._from_item()}"
            raw = _run(cursor.adbc_execute_schema, sql, self)
        return pa.schema([self._plain_field(field) for field in raw])

    def _readable_columns(self, cursor: Any) -> list[str]:
        """The table's columns the account may SELECT, in the table's order."""
        table = quote_table(self.section.table or "").replace("'", "''")
        sql = (
            "SELECT attname FROM pg_catalog.pg_attribute "
            f"WHERE attrelid = to_regclass('{table}') AND attnum > 0 "
            "AND NOT attisdropped "
            "AND has_column_privilege(attrelid, attnum, 'SELECT') ORDER BY attnum"
        )
        _run(cursor.execute, sql, self)
        return [str(row[0]) for row in _run(cursor.fetchall, None, self)]

    def _plain_field(self, field: pa.Field) -> pa.Field:
        if field.name in (self.schema.patient_id, self.schema.study_uid):
            dtype = pa.string()  # read as text: see _select_item
        else:
            dtype = pa.float64() if _is_numeric(field.type) else field.type
        return pa.field(field.name, dtype, nullable=field.nullable)

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Only ``columns``, ordered by study UID then patient id."""
        select = ", ".join(self._select_item(c) for c in columns)
        order = ", ".join(
            quote_identifier(c)
            for c in (self.schema.study_uid, self.schema.patient_id)
            if c in columns
        )
        sql = f"SELECT {select} FROM {self._from_item()}"
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
        # A server or network that goes silent mid-read is noticed, not waited on.
        for key, value in _KEEPALIVES.items():
            query.setdefault(key, value)
        # libpq reads these files relative to its working directory; the site's
        # other files (password-file, [data.pacs] ca-file) are relative to site.toml.
        for key in _TLS_FILES:
            if query.get(key) and query[key] != "system":
                path = Path(query[key]).expanduser()
                query[key] = str(path if path.is_absolute() else self.base_dir / path)
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
        # whatever the account may do; no statement waits without end on another
        # session's lock (an ETL's LOCK TABLE, a VACUUM FULL) or a runaway plan.
        timeout = f"{self.section.query_timeout_s}s"
        options = query.get("options", "")
        # the url's own options come after the timeouts, so a site's own
        # statement_timeout wins; read-only comes last, whatever they say
        query["options"] = (
            f"-c statement_timeout={timeout} -c lock_timeout={timeout} {options} "
            "-c default_transaction_read_only=on"
        ).replace("  ", " ")
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
    if "cleartext password" in lowered:
        why = "the server asks for the password in clear (LDAP, PAM or RADIUS login)"
        hint = (
            "wardround sends no cleartext password unless the url allows it: over "
            "sslmode=verify-full (so only the real server sees it) add "
            f"require_auth=password to {_SETTING} url."
        )
    elif (
        "password authentication failed" in lowered or "no password supplied" in lowered
    ):
        why = "the database refused the credentials"
        hint = (
            f"Check the user in {_SETTING} url and the password in its "
            "password-file or password-env."
        )
    elif "pg_hba.conf" in lowered:
        why = "the server accepts no login from this host for this user and database"
        hint = (
            "Ask the database's administrator for a pg_hba.conf line for this host, "
            "user and database (with the sslmode the url asks for)."
        )
    elif any(word in lowered for word in ("ssl", "certificate", "root.crt")):
        why = "the TLS set-up failed"
        hint = (
            f"Check sslmode and sslrootcert (the CA that signed the database's "
            f"certificate; a relative path is from site.toml's folder) in {_SETTING} "
            "url, that the host name matches the certificate, and that the server "
            "has TLS on."
        )
    elif "does not exist" in lowered:
        why = "the database or user does not exist"
        hint = f"Check the database name and user in {_SETTING} url."
    elif "connection refused" in lowered or "could not translate host" in lowered:
        why = "no database server answers there"
        hint = "Check host and port in the url, and that the server runs and listens."
    elif "invalid" in lowered and "option" in lowered:
        why = "the url has an invalid connection option"
        hint = f"Check the ?key=value options of {_SETTING} url (libpq's names)."
    elif "timeout expired" in lowered or "timed out" in lowered:
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
    if (
        getattr(exc, "sqlstate", None) == _LOCK_NOT_AVAILABLE
        or "statement timeout" in lowered
        or "lock timeout" in lowered
    ):
        seconds = source.section.query_timeout_s
        return DataError(
            f"{source.label}: the database did not answer within {seconds} s "
            "(a lock held by another session, or a long query)",
            hint=f"Retry when the other session is done (an ETL, a VACUUM FULL), or "
            f"raise query-timeout-s in {_SETTING} (now {seconds}).",
        )
    return DataError(
        f"{source.label} cannot be read: {_last_line(text)}", hint=source.fix_hint
    )


def _last_line(text: str) -> str:
    """The driver's message without the query echo and without a SQLSTATE tail."""
    first = text.split("\n")[0].strip()
    # ADBC's status code (IO:, NOT_FOUND:, UNAUTHORIZED:, CANCELLED: ...)
    first = re.sub(r"^[A-Z][A-Z_]+: ", "", first, count=1)
    return first.replace("[libpq] ", "")


def _is_numeric(dtype: pa.DataType) -> bool:
    # ADBC returns PostgreSQL numeric as an opaque extension type over its text
    return isinstance(dtype, pa.OpaqueType) and dtype.type_name == "numeric"


def _plain_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    arrays = []
    for column, field in zip(batch.columns, batch.schema, strict=True):
        if _is_numeric(field.type):
            storage = column.storage
            column = pc.cast(storage, pa.float64())
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
