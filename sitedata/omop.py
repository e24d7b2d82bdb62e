"""The OMOP CDM preset: one EHR row per visit, built by one query from the CDM tables.

``[data.ehr-database.omop]`` maps the run's names onto OMOP concepts. The query
gives one row per visit (``visit_occurrence``), or per imaging study of a visit
(the Medical Imaging extension's ``image_occurrence``), with these columns:

- ``patient_id``: ``person.person_id`` (or ``person_source_value``);
- ``study_uid``: ``visit_occurrence.visit_source_value`` (or
  ``image_occurrence.image_study_uid``), which joins DICOM StudyInstanceUID;
- ``note``: the visit's first ``note.note_text`` (by ``note_datetime``);
- per numeric feature, the visit's first ``value_as_number`` of its measurement
  (or observation) concept, and ``<feature>__unit``: the UCUM code
  (``concept.concept_code``) of its ``unit_concept_id``, converted row by row;
- ``age``: whole years from the birth date to the visit's start; ``gender``:
  the gender concept's code (``M``, ``F``);
- per categorical feature from an observation: its ``value_as_string``;
- per label: 1 when the visit has an observation (or condition) of its concept,
  else 0.

The declared mapping becomes the site's ``[ehr]`` schema
(:func:`omop_ehr_schema`), so the same schema check, units and encoding apply as
for any table. Concept ids are numbers and the CDM schema is a plain name; they
are the only values that enter the SQL.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..common.config import _Section

UNIT_SUFFIX = "__unit"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class OmopDerived(StrEnum):
    """Features computed from ``person``, not from a concept."""

    AGE = "age"  # whole years from birth to the visit's start
    GENDER = "gender"  # the gender concept's code (M, F)


class OmopFeature(_Section):
    """A feature from the visit's first measurement or observation of a concept."""

    measurement: int | None = Field(None, ge=1, description="measurement_concept_id")
    observation: int | None = Field(None, ge=1, description="observation_concept_id")
    value: str = Field(
        "number",
        description="'number': value_as_number with its unit; 'text': "
        "value_as_string (a categorical feature)",
    )

    @property
    def text(self) -> bool:
        """Whether the feature is the concept's text value (categorical)."""
        return self.value == "text"

    @model_validator(mode="after")
    def _one_concept(self) -> OmopFeature:
        if self.value not in ("number", "text"):
            raise ValueError("value is 'number' or 'text'")
        if (self.measurement is None) == (self.observation is None):
            raise ValueError("set one of measurement or observation (a concept id)")
        return self


class OmopLabel(_Section):
    """A label: 1 when the visit has an observation or condition of the concept."""

    observation: int | None = Field(None, ge=1, description="observation_concept_id")
    condition: int | None = Field(None, ge=1, description="condition_concept_id")

    @model_validator(mode="after")
    def _one_concept(self) -> OmopLabel:
        if (self.observation is None) == (self.condition is None):
            raise ValueError("set one of observation or condition (a concept id)")
        return self


class OmopPreset(_Section):
    """``[data.ehr-database.omop]``: the CDM's location and the concept mapping."""

    cdm_schema: str = Field("public", description="the schema of the CDM tables")
    patient_id: str = Field(
        "person_id", description="person_id, or person_source_value"
    )
    study_uid: str = Field(
        "visit_source_value",
        description="visit_source_value (holding the StudyInstanceUID), or "
        "image_occurrence (the Medical Imaging extension's image_study_uid)",
    )
    notes: bool = Field(True, description="the visit's first note_text as its note")
    features: dict[str, OmopDerived | OmopFeature] = Field(
        default_factory=dict,
        max_length=1024,
        description="run feature -> 'age', 'gender', or {measurement|observation = id}",
    )
    labels: dict[str, OmopLabel] = Field(
        default_factory=dict,
        max_length=1024,
        description="run label -> {observation|condition = concept id}",
    )
    not_recorded: tuple[str, ...] = Field(
        (),
        max_length=1024,
        description="run features and labels this site does not record (missing / "
        "unknown in every row)",
    )

    @field_validator("cdm_schema")
    @classmethod
    def _plain_schema(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError("cdm-schema must be a plain name (letters, digits, _)")
        return name

    @field_validator("patient_id")
    @classmethod
    def _patient_column(cls, name: str) -> str:
        if name not in ("person_id", "person_source_value"):
            raise ValueError("patient-id is person_id or person_source_value")
        return name

    @field_validator("study_uid")
    @classmethod
    def _study_column(cls, name: str) -> str:
        if name not in ("visit_source_value", "image_occurrence"):
            raise ValueError("study-uid is visit_source_value or image_occurrence")
        return name

    @model_validator(mode="after")
    def _plain_names(self) -> OmopPreset:
        bad = [n for n in (*self.features, *self.labels) if not _NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"run names must be plain identifiers: {bad}")
        return self


def omop_ehr_schema(preset: OmopPreset) -> dict[str, Any]:
    """The ``[ehr]`` table the query's columns satisfy (run names, unit columns)."""
    features: dict[str, Any] = {}
    for name, source in preset.features.items():
        if isinstance(source, OmopFeature) and not source.text:
            features[name] = {"column": name, "unit-column": name + UNIT_SUFFIX}
        else:
            features[name] = name
    return {
        "patient-id": "patient_id",
        "study-uid": "study_uid",
        **({"note": "note"} if preset.notes else {"note": None}),
        "features": features,
        "labels": {name: name for name in preset.labels},
        "not-recorded": list(preset.not_recorded),
    }


def omop_query(preset: OmopPreset) -> str:
    """The SELECT that gives one row per visit (see the module docstring)."""
    cdm = f'"{preset.cdm_schema}"'
    ctes = [_visits(preset, cdm)]
    columns = [
        f"CAST(p.{preset.patient_id} AS text) AS patient_id",
        "vi.study_uid AS study_uid",
    ]
    joins = [f"JOIN {cdm}.person p ON p.person_id = vi.person_id"]
    if preset.notes:
        ctes.append(
            f"notes AS (SELECT DISTINCT ON (n.visit_occurrence_id) "
            f"n.visit_occurrence_id, n.note_text FROM {cdm}.note n "
            f"ORDER BY n.visit_occurrence_id, n.note_datetime NULLS LAST, n.note_id)"
        )
        columns.append("notes.note_text AS note")
        joins.append(
            "LEFT JOIN notes ON notes.visit_occurrence_id = vi.visit_occurrence_id"
        )
    for k, (name, source) in enumerate(preset.features.items()):
        if source is OmopDerived.AGE:
            columns.append(
                "EXTRACT(YEAR FROM age(vi.visit_start_date, COALESCE("
                "CAST(p.birth_datetime AS date), make_date(p.year_of_birth, "
                "COALESCE(p.month_of_birth, 1), COALESCE(p.day_of_birth, 1)))))"
                f' AS "{name}"'
            )
        elif source is OmopDerived.GENDER:
            alias = f"g{k}"
            columns.append(
                f"CASE WHEN p.gender_concept_id = 0 THEN NULL "
                f'ELSE {alias}.concept_code END AS "{name}"'
            )
            joins.append(
                f"LEFT JOIN {cdm}.concept {alias} "
                f"ON {alias}.concept_id = p.gender_concept_id"
            )
        else:
            assert isinstance(source, OmopFeature)
            alias = f"f{k}"
            text = source.text
            ctes.append(_feature_cte(alias, source, cdm, text=text))
            columns.append(f'{alias}.value AS "{name}"')
            if not text:
                columns.append(f'{alias}.unit AS "{name}{UNIT_SUFFIX}"')
            joins.append(
                f"LEFT JOIN {alias} ON {alias}.visit_occurrence_id = "
                "vi.visit_occurrence_id"
            )
    for k, (name, label) in enumerate(preset.labels.items()):
        alias = f"l{k}"
        table, column = (
            ("observation", "observation_concept_id")
            if label.observation is not None
            else ("condition_occurrence", "condition_concept_id")
        )
        concept = label.observation or label.condition
        ctes.append(
            f"{alias} AS (SELECT DISTINCT t.visit_occurrence_id FROM {cdm}.{table} t "
            f"WHERE t.{column} = {int(concept or 0)})"
        )
        columns.append(
            f"CASE WHEN {alias}.visit_occurrence_id IS NULL THEN 0 ELSE 1 END "
            f'AS "{name}"'
        )
        joins.append(
            f"LEFT JOIN {alias} ON {alias}.visit_occurrence_id = vi.visit_occurrence_id"
        )
    return (
        "WITH "
        + ",\n".join(ctes)
        + "\nSELECT "
        + ",\n  ".join(columns)
        + "\nFROM visits vi\n"
        + "\n".join(joins)
    )


def _visits(preset: OmopPreset, cdm: str) -> str:
    if preset.study_uid == "image_occurrence":
        return (
            "visits AS (SELECT DISTINCT ON (io.image_study_uid) v.visit_occurrence_id, "
            "v.person_id, v.visit_start_date, io.image_study_uid AS study_uid "
            f"FROM {cdm}.image_occurrence io JOIN {cdm}.visit_occurrence v "
            "ON v.visit_occurrence_id = io.visit_occurrence_id "
            "ORDER BY io.image_study_uid, io.image_occurrence_id)"
        )
    return (
        "visits AS (SELECT v.visit_occurrence_id, v.person_id, v.visit_start_date, "
        f"v.visit_source_value AS study_uid FROM {cdm}.visit_occurrence v)"
    )


def _feature_cte(alias: str, source: OmopFeature, cdm: str, *, text: bool) -> str:
    table, kind = (
        ("measurement", "measurement")
        if source.measurement is not None
        else ("observation", "observation")
    )
    concept = int(source.measurement or source.observation or 0)
    value = "t.value_as_string" if text else "t.value_as_number"
    unit = "" if text else ", u.concept_code AS unit"
    unit_join = (
        ""
        if text
        else f" LEFT JOIN {cdm}.concept u ON u.concept_id = t.unit_concept_id"
    )
    return (
        f"{alias} AS (SELECT DISTINCT ON (t.visit_occurrence_id) t.visit_occurrence_id, "
        f"{value} AS value{unit} FROM {cdm}.{table} t{unit_join} "
        f"WHERE t.{kind}_concept_id = {concept} AND {value} IS NOT NULL "
        f"ORDER BY t.visit_occurrence_id, t.{kind}_datetime NULLS LAST, t.{kind}_id)"
    )
