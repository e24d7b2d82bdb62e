"""Load synthetic hospitals into real servers: the EHR into PostgreSQL.

``wardround synth --postgres URL`` writes each site's files as usual, then
loads its EHR table into one PostgreSQL table per site and writes
``site-servers.toml`` beside ``site.toml``: the same site, read from the server
instead of the file. Tests and the benchmark compare the two.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pyarrow.parquet as pq
import tomli_w

from ..common.errors import SourceUnreachable

SERVER_SITE_TOML = "site-servers.toml"


def ehr_table_name(site_name: str) -> str:
    """A plain SQL table name for a site's EHR (``site-01`` -> ``site_01_ehr``)."""
    return re.sub(r"[^a-z0-9_]", "_", site_name.lower()) + "_ehr"


def with_password(url: str, password: str | None) -> str:
    """``url`` with the password put in (for the driver only; never printed)."""
    if password is None:
        return url
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def load_ehr_into_postgres(
    site_toml: Path,
    url: str,
    password: str | None,
    *,
    table: str | None = None,
    grant_to: str | None = None,
) -> tuple[str, int]:
    """Copy a site's EHR Parquet into a new table (replaced if present).

    Returns the table name and the rows loaded. ``grant_to``: a role given
    SELECT on the table (the site's read-only account).
    """
    import adbc_driver_postgresql.dbapi as postgresql

    with site_toml.open("rb") as handle:
        doc = tomllib.load(handle)
    name = table or ehr_table_name(doc.get("site", {}).get("name", "site"))
    ehr = pq.read_table(site_toml.parent / doc["data"].get("ehr", "ehr.parquet"))
    try:
        connection = postgresql.connect(with_password(url, password))
    except Exception as exc:
        text = str(exc).replace(password or "\0", "***")
        raise SourceUnreachable(
            f"PostgreSQL at {_where(url)} cannot be reached: {text.splitlines()[0]}",
            hint="Check the url, that the server runs and the password.",
        ) from None
    with connection, connection.cursor() as cursor:
        cursor.execute(f'DROP TABLE IF EXISTS "{name}"')
        cursor.adbc_ingest(name, ehr, mode="create")
        if grant_to:
            cursor.execute(f'GRANT SELECT ON "{name}" TO "{grant_to}"')
        connection.commit()
    return name, ehr.num_rows


def write_server_site_toml(
    site_toml: Path,
    *,
    database: dict[str, Any] | None = None,
    pacs: dict[str, Any] | None = None,
) -> Path:
    """``site-servers.toml``: ``site.toml`` with its EHR and images from the servers.

    ``database`` and ``pacs`` are the ``[data.ehr-database]`` and ``[data.pacs]``
    tables. The cache folder is its own (the two files index different
    folders); the privacy ledger is shared: they are the same patients.
    """
    with site_toml.open("rb") as handle:
        doc = tomllib.load(handle)
    data = doc["data"]
    if database is not None:
        data.pop("ehr", None)
        data["ehr-database"] = database
    if pacs is not None:
        data.pop("dicom-dirs", None)
        data["pacs"] = pacs
    data["cache-dir"] = ".wardround-cache-servers"
    path = site_toml.parent / SERVER_SITE_TOML
    with path.open("wb") as handle:
        tomli_w.dump(doc, handle)
    return path


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"
