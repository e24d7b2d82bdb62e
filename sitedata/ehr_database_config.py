"""``[data.ehr-database]``: the site's EHR read straight from its PostgreSQL database.

The connection URL names the host, port, database and read-only account; the
password is in a 0600 file or an environment variable (:mod:`.secrets`), never
in ``site.toml``. The rows come from one table or view (only the declared
columns are selected), from one query (whose result may hold only declared
columns), or from the OMOP CDM tables (:mod:`.omop`).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, field_validator, model_validator

from ..common.errors import ConfigError
from .omop import OmopPreset
from .secrets import SecretSource

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
# libpq query keys that would move the connection away from the url's visible parts
_WHERE_KEYS = frozenset(
    {"host", "hostaddr", "port", "dbname", "user", "passfile", "service"}
)


def quote_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier (case kept, quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def quote_table(name: str) -> str:
    """``table`` or ``schema.table``, each part quoted."""
    return ".".join(quote_identifier(part) for part in name.split("."))


class EhrDatabaseSection(SecretSource):
    """Where the EHR rows are: a PostgreSQL table, view or query."""

    url: str = Field(
        description="postgresql://<read-only user>@<host>:<port>/<database>"
        "[?sslmode=verify-full&sslrootcert=...]; no password here"
    )
    table: str | None = Field(
        None, description="table or view (`schema.table`); declared columns only"
    )
    query: str | None = Field(
        None,
        description="one SELECT; every column it returns must be declared under [ehr]",
    )
    omop: OmopPreset | None = Field(
        None,
        description="the OMOP CDM preset: one row per visit from person, "
        "visit_occurrence, measurement, observation and note",
    )
    connect_timeout_s: int = Field(10, ge=1, le=600)
    query_timeout_s: int = Field(
        600,
        ge=1,
        le=86_400,
        description="the most one query may take, waits for another session's locks "
        "included; reading all the rows is one query",
    )

    @model_validator(mode="before")
    @classmethod
    def _postgres_without_password(cls, data: Any) -> Any:
        # A ConfigError, not a ValueError: pydantic would quote the input, and the
        # password with it, in its message.
        url = data.get("url") if isinstance(data, dict) else None
        if not isinstance(url, str):
            return data
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                "[data.ehr-database] url must start with postgresql:// "
                "(PostgreSQL is the database wardround reads)"
            )
        keys = [key for key, _ in parse_qsl(parts.query, keep_blank_values=True)]
        if parts.password is not None or "password" in keys:
            raise ConfigError(
                "[data.ehr-database] url holds a password",
                hint="Remove it from url; put it in a 0600 file named by "
                "password-file, or in the variable named by password-env.",
            )
        overriding = sorted(set(keys) & _WHERE_KEYS)
        if overriding:
            raise ConfigError(
                f"[data.ehr-database] url sets {', '.join(overriding)} in its query",
                hint="Name the host, port, database and user in the url itself "
                "(postgresql://user@host:5432/db), so that messages name the server "
                "the site really connects to.",
            )
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ConfigError(
                f"[data.ehr-database] url repeats {', '.join(repeated)} in its query"
            )
        try:
            port = parts.port
        except ValueError:  # not a number, or above 65535
            port = 0
        if port == 0:
            raise ConfigError(
                "[data.ehr-database] url port must be 1-65535",
                hint="Write the port as digits after the host: "
                "postgresql://user@host:5432/db",
            )
        if not parts.hostname or not parts.path.strip("/"):
            raise ConfigError(
                "[data.ehr-database] url must name a host and a database: "
                "postgresql://user@host:5432/db"
            )
        return data

    @field_validator("table")
    @classmethod
    def _plain_table_name(cls, table: str | None) -> str | None:
        if table is not None and not all(
            _IDENTIFIER.fullmatch(part) for part in table.split(".")
        ):
            raise ValueError(
                f"table {table!r} is not a plain name (letters, digits, _; "
                "optionally schema.table); use query for anything else"
            )
        return table

    @model_validator(mode="after")
    def _one_source(self) -> EhrDatabaseSection:
        named = [k for k in ("table", "query", "omop") if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError(
                "set exactly one of table, query or [data.ehr-database.omop]"
                + (f" (set: {', '.join(named)})" if named else "")
            )
        return self

    @property
    def where(self) -> str:
        """The database as messages name it: no password, no query parameters."""
        parts = urlsplit(self.url)
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
        return f"postgresql://{user}{parts.hostname}{port}{parts.path}"

    @property
    def what(self) -> str:
        """The rows as messages name them."""
        if self.table:
            return f"table {self.table}"
        return "the OMOP CDM preset" if self.omop else "the query"
