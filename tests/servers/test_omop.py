"""The OMOP CDM preset against a real PostgreSQL: the same sites as their files."""

from __future__ import annotations

import tomllib

import adbc_driver_postgresql.dbapi as postgresql
import pytest
import tomli_w
from postgres_server import READER, Postgres
from typer.testing import CliRunner

from wardround.cli import app
from wardround.client.site_check import check_site
from wardround.common.config import RunConfig
from wardround.common.errors import ConfigError
from wardround.simulations.hospital_servers import SERVER_SITE_TOML
from wardround.sitedata.omop import OmopPreset, omop_query
from wardround.sitedata.secrets import url_with_password
from wardround.sitedata.site_config import SiteConfig

TASK = RunConfig().task


@pytest.fixture(scope="module")
def omop_sites(postgres: Postgres, tmp_path_factory):
    """Two hospitals (one with renamed columns) loaded as OMOP CDM by `synth --omop`."""
    root = tmp_path_factory.mktemp("omop")
    result = CliRunner().invoke(
        app,
        ["synth", "--sites", "2", "--patients", "30", "--seed", "9",
         "--out", str(root), "--postgres", postgres.url("admin"),
         "--postgres-reader", READER, "--omop"],
        env={"PGPASSWORD": postgres.admin_password},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "OMOP CDM schema" in result.output
    return [root / "site-01", root / "site-02"]


@pytest.fixture(autouse=True)
def _reader_password(monkeypatch, postgres: Postgres):
    monkeypatch.setenv("WARDROUND_EHR_PASSWORD", postgres.reader_password)


def _variant(site, name: str, **omop: object):
    doc = tomllib.loads((site / SERVER_SITE_TOML).read_text())
    doc["data"]["ehr-database"]["omop"].update(omop)
    path = site / name
    path.write_text(tomli_w.dumps(doc))
    return path


def test_site_check_from_omop_equals_site_check_from_the_files(omop_sites):
    for site in omop_sites:
        from_files = check_site(site / "site.toml", TASK)
        from_omop = check_site(site / SERVER_SITE_TOML, TASK)
        assert from_omop["blocking"] == [], from_omop["blocking"]
        assert from_omop["fingerprint"] == from_files["fingerprint"]
        assert from_omop["join"] == from_files["join"]
        units = from_omop["ehr"].pop("unit_unknown")
        assert set(units) == set(TASK.numeric) - {"age"} and not any(units.values())
        assert from_omop["ehr"] == from_files["ehr"]
        assert "OMOP CDM preset" in from_omop["sources"]["ehr"]


def test_studies_from_image_occurrence_give_the_same_dataset(omop_sites):
    site = omop_sites[0]
    variant = _variant(site, "site-mi.toml", **{"study-uid": "image_occurrence"})
    assert (
        check_site(variant, TASK)["fingerprint"]
        == check_site(site / "site.toml", TASK)["fingerprint"]
    )


def test_a_unit_the_run_cannot_convert_counts_as_missing(omop_sites, postgres):
    site = omop_sites[1]
    schema = SiteConfig.from_toml(
        site / SERVER_SITE_TOML
    ).data.ehr_database.omop.cdm_schema
    before = check_site(site / SERVER_SITE_TOML, TASK)["ehr"]
    with (
        postgresql.connect(
            url_with_password(postgres.url("admin"), postgres.admin_password)
        ) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(
            f"UPDATE \"{schema}\".concept SET concept_code = 'furlong/fortnight' "
            "WHERE concept_code = 'mg/L'"
        )
        connection.commit()
    after = check_site(site / SERVER_SITE_TOML, TASK)["ehr"]
    known = round((1 - before["missing_fraction"]["crp"]) * after["rows"])
    assert after["unit_unknown"]["crp"] == known > 0
    assert after["missing_fraction"]["crp"] == 1.0
    assert after["unit_unknown"]["wbc"] == 0


def test_the_preset_mapping_is_checked(omop_sites, tmp_path):
    doc = tomllib.loads((omop_sites[0] / SERVER_SITE_TOML).read_text())
    doc["ehr"] = {"patient-id": "mrn"}
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(ConfigError, match="leave out \\[ehr\\]"):
        SiteConfig.from_toml(path)
    with pytest.raises(ValueError, match="plain name"):
        OmopPreset.model_validate({"cdm-schema": 'cdm"; DROP TABLE person; --'})
    with pytest.raises(ValueError, match="one of measurement or observation"):
        OmopPreset.model_validate(
            {"features": {"crp": {"measurement": 1, "observation": 2}}}
        )
    with pytest.raises(ValueError):
        OmopPreset.model_validate({"features": {"crp": {"measurement": "1 OR 1=1"}}})


def test_the_query_takes_the_first_value_of_a_visit_by_time():
    sql = omop_query(
        OmopPreset.model_validate(
            {"features": {"crp": {"measurement": 3020460}}, "labels": {}}
        )
    )
    assert "measurement_concept_id = 3020460" in sql
    assert "DISTINCT ON (t.visit_occurrence_id)" in sql
    assert "ORDER BY t.visit_occurrence_id, t.measurement_datetime NULLS LAST" in sql
