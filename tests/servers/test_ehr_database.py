"""The EHR read from a real PostgreSQL: the same site as from its Parquet file."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from postgres_server import READER, Postgres

from wardround.client.preflight import preflight_site
from wardround.client.site_check import check_site
from wardround.common.config import RunConfig
from wardround.common.errors import ConfigError, DataError, SourceUnreachable
from wardround.simulations.hospital_servers import (
    load_ehr_into_postgres,
    write_server_site_toml,
)
from wardround.sitedata.ehr import iter_ehr, open_ehr, read_ehr
from wardround.sitedata.ehr_source import ParquetEhr, ehr_source
from wardround.sitedata.site_config import SiteConfig
from wardround.synthetic.hospitals import synthesize_federation

TASK = RunConfig().task


def _password_file(folder: Path, password: str, mode: int = 0o600) -> Path:
    path = folder / "pg.password"
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def loaded(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory):
    """Two synthetic hospitals (one with renamed columns), loaded into PostgreSQL."""
    root = tmp_path_factory.mktemp("pg-sites")
    tomls = synthesize_federation(root, 2, patients_per_site=30, seed=11)
    servers = []
    for toml in tomls:
        table, rows = load_ehr_into_postgres(
            toml, postgres.url("admin"), postgres.admin_password, grant_to=READER
        )
        assert rows > 0
        pw = _password_file(toml.parent, postgres.reader_password)
        servers.append(
            write_server_site_toml(
                toml,
                database={
                    "url": postgres.url(),
                    "table": table,
                    "password-file": pw.name,
                },
            )
        )
    return list(zip(tomls, servers, strict=True))


def _server_site(toml: Path, **database: object) -> Path:
    """A copy of the server site.toml with ``[data.ehr-database]`` changed."""
    import tomllib

    import tomli_w

    doc = tomllib.loads(toml.read_text())
    doc["data"]["ehr-database"].update(database)
    for key in [k for k, v in database.items() if v is None]:
        del doc["data"]["ehr-database"][key]
    out = toml.parent / "site-variant.toml"
    out.write_text(tomli_w.dumps(doc))
    return out


def test_site_check_from_the_database_equals_site_check_from_the_file(loaded):
    for files_toml, server_toml in loaded:
        from_files = check_site(files_toml, TASK)
        from_server = check_site(server_toml, TASK)
        assert from_files["can_train"], from_files["blocking"]
        assert from_server["blocking"] == []
        assert from_server["fingerprint"] == from_files["fingerprint"]
        for section in ("ehr", "join", "dicom"):
            assert from_server[section] == from_files[section], section


def test_rows_stream_in_batches_and_only_declared_columns(loaded):
    files_toml, server_toml = loaded[1]  # the site with renamed columns
    site = SiteConfig.from_toml(server_toml)
    batches = list(iter_ehr(ehr_source(site), TASK, site.ehr, batch_rows=7))
    assert len(batches) >= 4 and all(b.num_rows <= 7 for b in batches)
    parquet = pq.read_table(SiteConfig.from_toml(files_toml).ehr_path)
    assert sum(b.num_rows for b in batches) == parquet.num_rows
    # declared columns only: the table's undeclared ones never leave the database
    assert "encounter" in parquet.column_names
    assert "encounter" not in batches[0].schema.names
    from_db = read_ehr(ehr_source(site), TASK, site.ehr)
    from_file = read_ehr(
        ParquetEhr(SiteConfig.from_toml(files_toml).ehr_path), TASK, site.ehr
    )
    key = site.ehr.study_uid
    assert from_db.sort_by(key).to_pylist() == from_file.sort_by(key).to_pylist()


def test_a_query_gives_the_same_rows(loaded):
    files_toml, server_toml = loaded[0]
    site = SiteConfig.from_toml(server_toml)
    table = site.data.ehr_database.table
    columns = ", ".join(open_ehr(ehr_source(site), TASK, site.ehr)[1])
    query_toml = _server_site(
        server_toml, table=None, query=f"SELECT {columns} FROM {table} WHERE age >= 0"
    )
    assert (
        check_site(query_toml, TASK)["fingerprint"]
        == check_site(files_toml, TASK)["fingerprint"]
    )


def test_a_query_with_an_undeclared_column_is_refused_before_any_row(loaded):
    _, server_toml = loaded[0]
    site = SiteConfig.from_toml(server_toml)
    table = site.data.ehr_database.table
    columns = ", ".join(open_ehr(ehr_source(site), TASK, site.ehr)[1])
    # Reading any row would divide by zero: the refusal comes from the schema alone.
    query_toml = _server_site(
        server_toml,
        table=None,
        query=f"SELECT {columns}, encounter, 1 / (age - age) AS probe FROM {table}",
    )
    variant = SiteConfig.from_toml(query_toml)
    with pytest.raises(DataError) as err:
        open_ehr(ehr_source(variant), TASK, variant.ehr)
    text = str(err.value)
    assert "2 undeclared column(s): 'encounter', 'probe'" in text
    assert "division by zero" not in text


def test_a_wrong_password_is_refused_without_printing_it(loaded, postgres):
    _, server_toml = loaded[0]
    wrong = "Wr0ng-" + postgres.reader_password
    (server_toml.parent / "wrong.pw").write_text(wrong)
    (server_toml.parent / "wrong.pw").chmod(0o600)
    variant = _server_site(server_toml, **{"password-file": "wrong.pw"})
    with pytest.raises(SourceUnreachable) as err:
        preflight_site(variant, TASK)
    text = str(err.value)
    assert "refused the credentials" in text
    assert postgres.url() in text
    assert wrong not in text and postgres.reader_password not in text
    report = check_site(variant, TASK)
    assert not report["can_train"]
    assert any("refused the credentials" in b for b in report["blocking"])
    assert wrong not in repr(report)


def test_a_server_that_is_down_is_named(loaded, postgres):
    _, server_toml = loaded[0]
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = postgres.url().replace(f":{postgres.port}/", f":{port}/")
    variant = _server_site(server_toml, url=url)
    with pytest.raises(SourceUnreachable) as err:
        preflight_site(variant, TASK)
    assert f"127.0.0.1:{port}" in str(err.value)
    assert "no database server answers" in str(err.value)


def test_a_missing_table_is_named(loaded):
    _, server_toml = loaded[0]
    variant = SiteConfig.from_toml(_server_site(server_toml, table="no_such_table"))
    with pytest.raises(DataError) as err:
        open_ehr(ehr_source(variant), TASK, variant.ehr)
    assert "no_such_table" in str(err.value)
    assert not isinstance(err.value, SourceUnreachable)


def test_the_session_is_read_only_whatever_the_account_may_do(loaded, postgres):
    _, server_toml = loaded[0]
    (server_toml.parent / "admin.pw").write_text(postgres.admin_password)
    (server_toml.parent / "admin.pw").chmod(0o600)
    variant = SiteConfig.from_toml(
        _server_site(
            server_toml, url=postgres.url("admin"), **{"password-file": "admin.pw"}
        )
    )
    source = ehr_source(variant)
    with source._cursor() as cursor, pytest.raises(Exception, match="read-only"):
        cursor.execute("CREATE TABLE written_by_a_site (x int)")


def test_credentials_stay_out_of_site_toml_and_shared_files(loaded, tmp_path):
    _, server_toml = loaded[0]
    doc = server_toml.read_text()
    with pytest.raises(ConfigError, match="password-file"):
        SiteConfig.from_toml(
            _with_text(
                tmp_path,
                doc.replace(
                    "postgresql://wardround_reader@",
                    "postgresql://wardround_reader:secret@",
                ),
            )
        )
    variant = SiteConfig.from_toml(_server_site(server_toml))
    (server_toml.parent / "pg.password").chmod(0o644)
    try:
        with pytest.raises(ConfigError, match="readable by others"):
            open_ehr(ehr_source(variant), TASK, variant.ehr)
    finally:
        (server_toml.parent / "pg.password").chmod(0o600)


def test_password_from_the_environment(loaded, postgres, monkeypatch):
    _, server_toml = loaded[0]
    monkeypatch.setenv("WARDROUND_TEST_PG", postgres.reader_password)
    variant = SiteConfig.from_toml(
        _server_site(
            server_toml, **{"password-file": None, "password-env": "WARDROUND_TEST_PG"}
        )
    )
    assert open_ehr(ehr_source(variant), TASK, variant.ehr)[1]
    monkeypatch.delenv("WARDROUND_TEST_PG")
    with pytest.raises(ConfigError, match="WARDROUND_TEST_PG"):
        open_ehr(ehr_source(variant), TASK, variant.ehr)


def _with_text(folder: Path, text: str) -> Path:
    path = folder / "site.toml"
    path.write_text(text)
    return path


def test_both_a_file_and_a_database_is_refused(loaded, tmp_path):
    _, server_toml = loaded[0]
    doc = server_toml.read_text().replace(
        "[data]\n", '[data]\nehr = "ehr.parquet"\n', 1
    )
    with pytest.raises(ConfigError, match="not both"):
        SiteConfig.from_toml(_with_text(tmp_path, doc))
    assert os.environ.get("PGPASSWORD") is None
