"""The EHR read from a real PostgreSQL: the same site as from its Parquet file."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
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


def _admin(postgres: Postgres):
    """An ADBC connection as the admin role (the test's hand on the database)."""
    from urllib.parse import quote

    import adbc_driver_postgresql.dbapi as adbc

    password = quote(postgres.admin_password, safe="")
    url = postgres.url("admin").replace("admin@", f"admin:{password}@")
    return adbc.connect(url, autocommit=True)


def _admin_sql(postgres: Postgres, *statements: str) -> list[tuple]:
    """Run ``statements`` as admin, each on its own; the last one's rows."""
    with _admin(postgres) as connection, connection.cursor() as cursor:
        rows: list[tuple] = []
        for statement in statements:
            cursor.execute(statement)
            rows = cursor.fetchall() if cursor.description else []
    return rows


def _table_columns(postgres: Postgres, table: str) -> list[str]:
    rows = _admin_sql(
        postgres,
        "SELECT column_name FROM information_schema.columns "
        f"WHERE table_name = '{table}' ORDER BY ordinal_position",
    )
    return [str(name) for (name,) in rows]


def test_a_locked_table_gives_up_after_query_timeout_s(loaded, postgres):
    from postgres_server import _binaries

    _, server_toml = loaded[0]
    table = SiteConfig.from_toml(server_toml).data.ehr_database.table
    variant = SiteConfig.from_toml(_server_site(server_toml, **{"query-timeout-s": 1}))
    # Another session (an ETL, a VACUUM FULL) holds the table's lock for 20 s.
    locker = subprocess.Popen(
        [
            str(_binaries() / "psql"),
            "-X",
            "-h",
            postgres.host,
            "-p",
            str(postgres.port),
            "-U",
            "admin",
            "-d",
            "hospital",
            "-c",
            f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; "
            "SELECT pg_sleep(20); COMMIT;",
        ],
        env={**os.environ, "PGPASSWORD": postgres.admin_password},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _admin_sql(
            postgres,
            "SELECT 1 FROM pg_locks WHERE mode = 'AccessExclusiveLock' "
            f"AND relation = '{table}'::regclass AND granted",
        ):
            assert time.monotonic() < deadline, "the lock was not taken"
            time.sleep(0.1)
        started = time.monotonic()

        with pytest.raises(DataError) as err:
            open_ehr(ehr_source(variant), TASK, variant.ehr)

        assert time.monotonic() - started < 10
        assert "did not answer within 1 s" in str(err.value)
        assert "query-timeout-s" in (err.value.hint or "")
        assert not isinstance(err.value, SourceUnreachable)
    finally:
        locker.kill()
        locker.wait(timeout=10)


def test_a_uuid_patient_id_is_read_as_its_text(loaded, postgres):
    _, server_toml = loaded[0]
    site = SiteConfig.from_toml(server_toml)
    table = site.data.ehr_database.table
    pid, uid = site.ehr.patient_id, site.ehr.study_uid
    others = [c for c in _table_columns(postgres, table) if c not in (pid, uid)]
    _admin_sql(
        postgres,
        # a table of its own: a view would keep other tests from replacing theirs
        f"CREATE TABLE uuid_ids AS SELECT md5({pid})::uuid AS {pid}, {uid}, "
        f"{', '.join(others)} FROM {table}",
        f"GRANT SELECT ON uuid_ids TO {READER}",
    )
    from_table = SiteConfig.from_toml(_server_site(server_toml, table="uuid_ids"))
    from_query = SiteConfig.from_toml(
        _server_site(server_toml, table=None, query=f"SELECT {pid} FROM uuid_ids")
    )
    expected = read_ehr(ehr_source(site), TASK, site.ehr)

    table_rows = read_ehr(ehr_source(from_table), TASK, from_table.ehr)
    query_source = ehr_source(from_query)
    query_rows = pa.Table.from_batches(list(query_source.batches([pid], 100)))

    wanted = sorted(
        str(uuid.UUID(hashlib.md5(p.encode()).hexdigest()))
        for p in expected.column(pid).to_pylist()
    )
    assert table_rows.num_rows == expected.num_rows
    assert table_rows.schema.field(pid).type == pa.string()
    assert sorted(table_rows.column(pid).to_pylist()) == wanted
    assert query_source.arrow_schema().field(pid).type == pa.string()
    assert sorted(query_rows.column(pid).to_pylist()) == wanted


def test_a_role_denied_an_undeclared_column_reads_the_rest(loaded, postgres):
    _, server_toml = loaded[0]
    site = SiteConfig.from_toml(server_toml)
    table = site.data.ehr_database.table
    columns = _table_columns(postgres, table)
    _admin_sql(
        postgres,
        f"CREATE TABLE with_ssn AS SELECT *, '123-45-6789'::text AS ssn FROM {table}",
        f"GRANT SELECT ({', '.join(columns)}) ON with_ssn TO {READER}",
    )
    variant = SiteConfig.from_toml(_server_site(server_toml, table="with_ssn"))

    source, wanted = open_ehr(ehr_source(variant), TASK, variant.ehr)
    rows = read_ehr(ehr_source(variant), TASK, variant.ehr)

    assert "ssn" not in source.arrow_schema().names
    assert rows.num_rows == read_ehr(ehr_source(site), TASK, site.ehr).num_rows
    assert rows.column_names == wanted


def test_a_one_line_query_may_end_in_a_comment(loaded):
    files_toml, server_toml = loaded[0]
    site = SiteConfig.from_toml(server_toml)
    table = site.data.ehr_database.table
    columns = ", ".join(open_ehr(ehr_source(site), TASK, site.ehr)[1])
    query_toml = _server_site(
        server_toml,
        table=None,
        query=f"SELECT {columns} FROM {table} WHERE age >= 0 -- adults and children",
    )

    report = check_site(query_toml, TASK)

    assert report["blocking"] == []
    assert report["fingerprint"] == check_site(files_toml, TASK)["fingerprint"]


def test_connection_messages_name_the_real_cause(loaded, postgres):
    _, server_toml = loaded[0]
    cases = {
        "?sslmode=require": "the TLS set-up failed",  # this server has no TLS
        "?connect_timeout=abc": "the url has an invalid connection option",
    }
    for options, why in cases.items():
        variant = _server_site(server_toml, url=postgres.url() + options)
        with pytest.raises(SourceUnreachable) as err:
            preflight_site(variant, TASK)
        assert why in str(err.value), options
        assert "does not exist" not in str(err.value)
        assert "timed out" not in str(err.value)
    (server_toml.parent / "wrong.pw").write_text("Wr0ng")
    (server_toml.parent / "wrong.pw").chmod(0o600)
    variant = _server_site(server_toml, **{"password-file": "wrong.pw"})
    with pytest.raises(SourceUnreachable) as err:
        preflight_site(variant, TASK)
    assert "refused the credentials" in str(err.value)
    assert "UNAUTHORIZED" not in str(err.value)


CLEARTEXT_READER = "cleartext_reader"


@dataclass(frozen=True)
class TlsPostgres:
    server: Postgres
    ca_file: Path  # the self-signed certificate the server presents


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[TlsPostgres]:
    """A PostgreSQL of its own with TLS on, and a role that logs in by cleartext."""
    from postgres_server import _as_server_user, start_postgres, stop_postgres

    root = Path(tempfile.mkdtemp(prefix="wr-postgres-tls-"))
    try:
        server, process = start_postgres(root / "server")
        try:
            tls = root / "server" / "tls"
            tls.mkdir()
            subprocess.run(
                [
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    str(tls / "server.key"),
                    "-out",
                    str(tls / "server.crt"),
                    "-days",
                    "2",
                    "-subj",
                    "/CN=localhost",
                    "-addext",
                    "subjectAltName=DNS:localhost",
                ],  # fmt: skip
                check=True,
                capture_output=True,
            )
            (tls / "server.key").chmod(0o600)
            if _as_server_user():
                for path in (tls, tls / "server.key", tls / "server.crt"):
                    shutil.chown(path, "postgres", "postgres")
            hba = root / "server" / "data" / "pg_hba.conf"
            hba.write_text(
                f"host hospital {CLEARTEXT_READER} 127.0.0.1/32 password\n"
                + hba.read_text()
            )
            _admin_sql(
                server,
                "ALTER SYSTEM SET ssl = on",
                f"ALTER SYSTEM SET ssl_cert_file = '{tls / 'server.crt'}'",
                f"ALTER SYSTEM SET ssl_key_file = '{tls / 'server.key'}'",
                f"CREATE ROLE {CLEARTEXT_READER} LOGIN PASSWORD "
                f"'{server.reader_password}'",
                "CREATE TABLE tls_probe (patient_id text, study_uid text)",
                f"GRANT SELECT ON tls_probe TO {READER}, {CLEARTEXT_READER}",
            )
            _admin_sql(server, "SELECT pg_reload_conf()")
            time.sleep(0.5)
            yield TlsPostgres(server, tls / "server.crt")
        finally:
            stop_postgres(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _tls_site(server_toml: Path, tls: TlsPostgres, user: str, options: str) -> Path:
    """A site.toml beside the CA file and the TLS server's password file."""
    shutil.copy(tls.ca_file, server_toml.parent / "db-ca.pem")
    (server_toml.parent / "tls.pw").write_text(tls.server.reader_password)
    (server_toml.parent / "tls.pw").chmod(0o600)
    url = f"postgresql://{user}@localhost:{tls.server.port}/hospital{options}"
    return _server_site(
        server_toml, url=url, table="tls_probe", **{"password-file": "tls.pw"}
    )


def test_tls_problems_are_named_as_tls(loaded, tls_postgres, tmp_path, monkeypatch):
    _, server_toml = loaded[0]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    monkeypatch.chdir(tmp_path)  # not site.toml's folder
    without_ca = _tls_site(server_toml, tls_postgres, READER, "?sslmode=verify-full")
    with pytest.raises(SourceUnreachable) as err:
        preflight_site(without_ca, TASK)
    assert "the TLS set-up failed" in str(err.value)
    assert "sslrootcert" in (err.value.hint or "")
    assert "database or user does not exist" not in str(err.value)

    # sslrootcert relative to site.toml, as password-file and ca-file are
    with_ca = SiteConfig.from_toml(
        _tls_site(
            server_toml,
            tls_postgres,
            READER,
            "?sslmode=verify-full&sslrootcert=db-ca.pem",
        )
    )
    assert ehr_source(with_ca).arrow_schema().names == ["patient_id", "study_uid"]


def test_a_server_asking_for_a_cleartext_password_says_how_to_allow_it(
    loaded, tls_postgres
):
    _, server_toml = loaded[0]
    verified = "?sslmode=verify-full&sslrootcert=db-ca.pem"
    refused = _tls_site(server_toml, tls_postgres, CLEARTEXT_READER, verified)
    with pytest.raises(SourceUnreachable) as err:
        preflight_site(refused, TASK)
    assert "asks for the password in clear" in str(err.value)
    assert "require_auth=password" in (err.value.hint or "")
    assert tls_postgres.server.reader_password not in str(err.value)

    allowed = SiteConfig.from_toml(
        _tls_site(
            server_toml,
            tls_postgres,
            CLEARTEXT_READER,
            verified + "&require_auth=password",
        )
    )
    assert ehr_source(allowed).arrow_schema().names == ["patient_id", "study_uid"]
