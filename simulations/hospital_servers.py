"""Load synthetic hospitals into real servers: the EHR into PostgreSQL, images into a PACS.

``wardround synth --postgres URL --pacs URL`` writes each site's files as
usual, then loads its EHR table into one PostgreSQL table per site, stores its
DICOM files in the PACS (STOW-RS) and writes ``site-servers.toml`` beside
``site.toml``: the same site, read from the servers instead of the files.
Tests and the benchmarks compare the two. (Only this loader writes to a PACS;
a site only ever reads from it.)
"""

from __future__ import annotations

import datetime
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import tomli_w

from ..common.errors import SourceUnreachable
from ..sitedata.secrets import url_with_password

SERVER_SITE_TOML = "site-servers.toml"


def ehr_table_name(site_name: str) -> str:
    """A plain SQL table name for a site's EHR (``site-01`` -> ``site_01_ehr``)."""
    return re.sub(r"[^a-z0-9_]", "_", site_name.lower()) + "_ehr"


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
    with site_toml.open("rb") as handle:
        doc = tomllib.load(handle)
    name = table or ehr_table_name(doc.get("site", {}).get("name", "site"))
    ehr = pq.read_table(site_toml.parent / doc["data"].get("ehr", "ehr.parquet"))
    connection = _connect(url, password)
    with connection, connection.cursor() as cursor:
        cursor.execute(f'DROP TABLE IF EXISTS "{name}"')
        cursor.adbc_ingest(name, ehr, mode="create")
        if grant_to:
            cursor.execute(f'GRANT SELECT ON "{name}" TO "{grant_to}"')
        connection.commit()
    return name, ehr.num_rows


def store_folder_in_pacs(
    folder: Path,
    url: str,
    username: str | None,
    password: str | None,
    *,
    per_request: int = 16,
) -> int:
    """STOW-RS every DICOM file under ``folder`` to the PACS; return the count.

    Files are sent as read (``pydicom.dcmwrite`` keeps their encoding), so the
    PACS holds the same bytes as the folder.
    """
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if username is not None:
        session.auth = (username, password or "")
    client = DICOMwebClient(url, session=session)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stored = 0
    for start in range(0, len(files), per_request):
        batch = [pydicom.dcmread(p) for p in files[start : start + per_request]]
        try:
            client.store_instances(batch)
        except requests.RequestException as exc:
            raise SourceUnreachable(
                f"the PACS at {url} did not store the synthetic images "
                f"({type(exc).__name__}: {getattr(exc.response, 'status_code', '')})",
                hint="Check the url (the DICOMweb root), the user and "
                "$WARDROUND_PACS_PASSWORD.",
            ) from None
        stored += len(batch)
    return stored


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
        if "omop" in database:
            doc.pop("ehr", None)  # the preset's mapping is the schema
    if pacs is not None:
        data.pop("dicom-dirs", None)
        data["pacs"] = pacs
    data["cache-dir"] = ".wardround-cache-servers"
    path = site_toml.parent / SERVER_SITE_TOML
    with path.open("wb") as handle:
        tomli_w.dump(doc, handle)
    return path


def _connect(url: str, password: str | None) -> Any:
    """An ADBC connection as the loading account, or SourceUnreachable (no secret)."""
    import adbc_driver_postgresql.dbapi as postgresql

    try:
        return postgresql.connect(url_with_password(url, password))
    except Exception as exc:
        text = str(exc).replace(password or "\0", "***")
        raise SourceUnreachable(
            f"PostgreSQL at {_where(url)} cannot be reached: {text.splitlines()[0]}",
            hint="Check the url, that the server runs and the password.",
        ) from None


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


# The concepts the synthetic OMOP load uses. Measurements: LOINC concepts; findings:
# observation concepts; gender: OMOP's gender concepts. A real site names its own
# in [data.ehr-database.omop].
OMOP_MEASUREMENTS = {
    "temperature": 3020891,
    "heart_rate": 3027018,
    "spo2": 3016502,
    "wbc": 3000905,
    "crp": 3020460,
    "bnp": 3029187,
}
OMOP_GENDER = {"M": 8507, "F": 8532}
# Each finding an observation concept; pneumonia a condition, so both label
# sources of the preset are used.
OMOP_FINDINGS = {
    "nodule": ("observation", 4221279),
    "effusion": ("observation", 254061),
    "pneumonia": ("condition", 255848),
    "cardiomegaly": ("observation", 4108219),
}
#: the run's unit names -> UCUM codes (concept_code of OMOP's unit concepts)
UCUM = {
    "degc": "Cel",
    "degf": "[degF]",
    "bpm": "/min",
    "%": "%",
    "10^9/l": "10*9/L",
    "mg/l": "mg/L",
    "mg/dl": "mg/dL",
    "pg/ml": "pg/mL",
    "years": "a",
}
_VISIT_DATE = datetime.date(2023, 6, 15)


def load_ehr_into_omop(
    site_toml: Path,
    url: str,
    password: str | None,
    *,
    cdm_schema: str | None = None,
    grant_to: str | None = None,
) -> tuple[dict[str, Any], int]:
    """Write a site's EHR as OMOP CDM tables in their own schema (replaced if present).

    One person per patient, one visit per EHR row (``visit_source_value`` and an
    ``image_occurrence`` row holding the study UID), a measurement per numeric
    value with its unit concept, an observation or condition per positive
    finding, a note per note. Returns the ``[data.ehr-database.omop]`` table
    that reads it back, and the visits written.
    """
    import pyarrow as pa

    from ..common.config import TaskConfig
    from ..sitedata.ehr import read_ehr
    from ..sitedata.site_config import SiteConfig
    from ..sitedata.units import normalise_unit

    site = SiteConfig.from_toml(site_toml)
    task = TaskConfig()
    schema = cdm_schema or ehr_table_name(site.site.name).replace("_ehr", "_omop")
    ehr = read_ehr(site.ehr_path, task, site.ehr)
    spec = site.ehr
    rows = ehr.num_rows
    persons: dict[str, int] = {}
    tables: dict[str, dict[str, list[Any]]] = {
        name: {} for name in ("person", "visit_occurrence", "measurement",
                              "observation", "condition_occurrence", "note",
                              "image_occurrence", "concept")
    }  # fmt: skip

    def add(table: str, **values: Any) -> None:
        for key, value in values.items():
            tables[table].setdefault(key, []).append(value)

    column = {c: ehr.column(c).to_pylist() for c in ehr.column_names}
    nothing = [None] * rows

    def feature(name: str) -> list[Any]:  # null in every row where not recorded
        return column[spec.feature_column(name)] if spec.records(name) else nothing

    def label(name: str) -> list[Any]:
        return column[spec.label_column(name)] if spec.records(name) else nothing

    ages = feature("age")
    sexes = feature("sex")
    units: dict[str, int] = {}
    for i in range(rows):
        patient = column[spec.patient_id][i]
        visit = i + 1
        if patient not in persons:
            persons[patient] = len(persons) + 1
            age = ages[i]
            sex = spec.feature_spec("sex").map.get(sexes[i], sexes[i])
            add(
                "person",
                person_id=persons[patient],
                gender_concept_id=OMOP_GENDER.get(sex, 0),
                year_of_birth=None if age is None else 2023 - int(age),
                month_of_birth=1,
                day_of_birth=1,
                person_source_value=patient,
            )
        person = persons[patient]
        study = column[spec.study_uid][i]
        add("visit_occurrence", visit_occurrence_id=visit, person_id=person,
            visit_concept_id=9202, visit_start_date=_VISIT_DATE,
            visit_source_value=study)  # fmt: skip
        add("image_occurrence", image_occurrence_id=visit, person_id=person,
            visit_occurrence_id=visit, image_occurrence_date=_VISIT_DATE,
            image_study_uid=study)  # fmt: skip
        for name, concept in OMOP_MEASUREMENTS.items():
            value = feature(name)[i]
            if value is None:
                continue
            unit = normalise_unit(spec.feature_spec(name).unit or task.units[name])
            unit_id = units.setdefault(unit, 9_000_000 + len(units))
            add("measurement", measurement_id=len(tables["measurement"].get(
                "measurement_id", [])) + 1, person_id=person,
                measurement_concept_id=concept, measurement_date=_VISIT_DATE,
                value_as_number=float(value), unit_concept_id=unit_id,
                visit_occurrence_id=visit)  # fmt: skip
        for name, (kind, concept) in OMOP_FINDINGS.items():
            if not label(name)[i]:
                continue
            table = "observation" if kind == "observation" else "condition_occurrence"
            key = f"{table}_id"
            add(table, **{key: len(tables[table].get(key, [])) + 1,
                "person_id": person, f"{kind}_concept_id": concept,
                "visit_occurrence_id": visit})  # fmt: skip
        note = column[spec.note][i] if spec.note else None
        if note is not None:
            add("note", note_id=len(tables["note"].get("note_id", [])) + 1,
                person_id=person, note_date=_VISIT_DATE, note_text=note,
                visit_occurrence_id=visit)  # fmt: skip
    for code, concept_id in [
        *((k, v) for k, v in OMOP_GENDER.items()),
        *((UCUM.get(unit, unit), unit_id) for unit, unit_id in units.items()),
    ]:
        add("concept", concept_id=concept_id, concept_code=code)
    connection = _connect(url, password)
    with connection, connection.cursor() as cursor:
        cursor.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        cursor.execute(f'CREATE SCHEMA "{schema}"')
        for table, values in tables.items():
            cursor.execute(f'CREATE TABLE "{schema}".{table} ({_OMOP_DDL[table]})')
            if values:
                # a staging table of Arrow's types, then the CDM's by assignment
                staging = f"wardround_load_{table}"
                cursor.adbc_ingest(staging, pa.table(values), mode="replace")
                names = ", ".join(values)
                cursor.execute(
                    f'INSERT INTO "{schema}".{table} ({names}) '
                    f"SELECT {names} FROM {staging}"
                )
                cursor.execute(f"DROP TABLE {staging}")
        if grant_to:
            cursor.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{grant_to}"')
            cursor.execute(
                f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{grant_to}"'
            )
        connection.commit()
    preset = {
        "cdm-schema": schema,
        "patient-id": "person_source_value",
        "features": {
            "age": "age",
            "sex": "gender",
            **{name: {"measurement": c} for name, c in OMOP_MEASUREMENTS.items()},
        },
        "labels": {name: {kind: c} for name, (kind, c) in OMOP_FINDINGS.items()},
    }
    return preset, rows


# The CDM 5.4 columns the preset reads (and the Medical Imaging extension's
# image_occurrence), with the CDM's types.
_OMOP_DDL = {
    "person": "person_id integer NOT NULL, gender_concept_id integer NOT NULL, "
    "year_of_birth integer, month_of_birth integer, day_of_birth integer, "
    "birth_datetime timestamp, person_source_value varchar(50)",
    "visit_occurrence": "visit_occurrence_id integer NOT NULL, person_id integer "
    "NOT NULL, visit_concept_id integer NOT NULL, visit_start_date date NOT NULL, "
    "visit_source_value varchar(50)",
    "measurement": "measurement_id integer NOT NULL, person_id integer NOT NULL, "
    "measurement_concept_id integer NOT NULL, measurement_date date NOT NULL, "
    "measurement_datetime timestamp, value_as_number numeric, unit_concept_id "
    "integer, visit_occurrence_id integer",
    "observation": "observation_id integer NOT NULL, person_id integer NOT NULL, "
    "observation_concept_id integer NOT NULL, observation_datetime timestamp, "
    "value_as_number numeric, value_as_string varchar(60), unit_concept_id integer, "
    "visit_occurrence_id integer",
    "condition_occurrence": "condition_occurrence_id integer NOT NULL, person_id integer NOT "
    "NULL, condition_concept_id integer NOT NULL, visit_occurrence_id integer",
    "note": "note_id integer NOT NULL, person_id integer NOT NULL, note_date date "
    "NOT NULL, note_datetime timestamp, note_text text NOT NULL, "
    "visit_occurrence_id integer",
    "image_occurrence": "image_occurrence_id integer NOT NULL, person_id integer "
    "NOT NULL, visit_occurrence_id integer, image_occurrence_date date NOT NULL, "
    "image_study_uid varchar(250) NOT NULL",
    "concept": "concept_id integer NOT NULL, concept_code varchar(50) NOT NULL",
}
