"""The database and PACS settings refuse what would leak a secret or mislead."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
import tomli_w
from typer.testing import CliRunner

from wardround.cli import app
from wardround.common.errors import ConfigError
from wardround.sitedata.ehr_database_config import EhrDatabaseSection
from wardround.sitedata.ehr_sql import DatabaseEhr
from wardround.sitedata.pacs_backend import InstanceRef
from wardround.sitedata.pacs_config import PacsSection
from wardround.sitedata.pacs_dimse import DimseBackend
from wardround.sitedata.secrets import SecretSource, read_secret
from wardround.sitedata.site_config import EhrSchema, SiteConfig

URL = "postgresql://reader@db.hospital.example:5432/hospital"


def _site(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps({"data": data}))
    return path


@pytest.mark.parametrize(
    "url, says",
    [
        (URL + "?password=Hunter2-secret", "holds a password"),
        ("postgresql://reader:Hunter2-secret@db:5432/h", "holds a password"),
        (URL + "?host=127.0.0.1&port=1", "sets host, port"),
        (URL + "?sslmode=verify-full&sslmode=disable", "repeats sslmode"),
        ("mysql://reader@db:3306/h", "postgresql://"),
    ],
)
def test_a_database_url_that_would_mislead_or_leak_is_refused(tmp_path, url, says):
    toml = _site(tmp_path, {"ehr-database": {"url": url, "table": "ehr"}})
    with pytest.raises(ConfigError) as err:
        SiteConfig.from_toml(toml)
    assert says in str(err.value)
    assert "Hunter2-secret" not in str(err.value)


def test_a_section_error_does_not_echo_the_section(tmp_path):
    url = URL + "?sslmode=verify-full&sslrootcert=/etc/private/Hidden-CA.pem"
    toml = _site(tmp_path, {"ehr-database": {"url": url, "table": "t", "query": "q"}})
    with pytest.raises(ConfigError) as err:
        SiteConfig.from_toml(toml)
    assert "exactly one of table, query" in str(err.value)
    assert "Hidden-CA" not in str(err.value)


def test_a_pacs_url_with_a_query_is_refused_without_echoing_it(tmp_path):
    pacs = {"protocol": "dicomweb", "url": "https://pacs/dicom-web?access_token=Tok3n"}
    with pytest.raises(ConfigError) as err:
        SiteConfig.from_toml(_site(tmp_path, {"pacs": pacs}))
    assert "without ?query" in str(err.value) and "Tok3n" not in str(err.value)


def test_the_driver_is_told_never_to_send_the_password_in_clear(tmp_path, caplog):
    secret = tmp_path / "pw"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    section = EhrDatabaseSection(url=URL, table="ehr", password_file=str(secret))
    with caplog.at_level(logging.WARNING):
        uri, _ = DatabaseEhr(section, tmp_path, EhrSchema())._uri()
    query = parse_qs(urlsplit(uri).query)
    assert query["require_auth"] == ["!password"]
    assert "default_transaction_read_only=on" in query["options"][0]
    assert "not verified TLS" in caplog.text and "s3cret" not in caplog.text
    verified = EhrDatabaseSection(
        url=URL + "?sslmode=verify-full", table="ehr", password_file=str(secret)
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        DatabaseEhr(verified, tmp_path, EhrSchema())._uri()
    assert "not verified TLS" not in caplog.text


def test_a_password_with_a_control_character_is_refused(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("abc\x00def\n")
    secret.chmod(0o600)
    with pytest.raises(ConfigError, match="control character") as err:
        read_secret(SecretSource(password_file=str(secret)), tmp_path, "[x]")
    assert "abc" not in str(err.value)
    monkeypatch.setenv("WR_TEST_PW", "tab\there")
    with pytest.raises(ConfigError, match="control character"):
        read_secret(SecretSource(password_env="WR_TEST_PW"), tmp_path, "[x]")


def test_synth_refuses_a_password_in_the_postgres_url(tmp_path):
    result = CliRunner().invoke(
        app,
        ["synth", "--sites", "1", "--patients", "10", "--out", str(tmp_path),
         "--postgres", "postgresql://admin:Hunter2@127.0.0.1:1/h"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "PGPASSWORD" in result.output
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_c_move_stores_are_taken_only_from_the_pacs_addresses(tmp_path):
    section = PacsSection.model_validate(
        {"protocol": "dimse", "host": "127.0.0.1", "port": 11112,
         "called-ae": "PACS", "retrieve": "c-move", "move-port": 11113}
    )  # fmt: skip
    backend = DimseBackend(section, tmp_path)
    wanted = InstanceRef("1.2.3", "1.2.3.4")
    backend._wanted = {wanted.sop_uid: wanted}

    def store_from(address: str) -> int:
        event = SimpleNamespace(
            assoc=SimpleNamespace(
                is_acceptor=True, requestor=SimpleNamespace(address=address)
            ),
            request=SimpleNamespace(AffectedSOPInstanceUID=wanted.sop_uid),
            encoded_dataset=lambda: b"DICM",
        )
        return backend._on_store(event)

    assert store_from("::1") == 0xC000  # loopback, but not an address of 127.0.0.1
    assert backend._received.empty()
    assert store_from("127.0.0.1") == 0x0000
    assert not backend._received.empty()


def test_a_sites_own_multi_line_query_is_accepted(tmp_path):
    """The printable-text rule is the run config's (shown to every operator), not site.toml's."""
    path = _site(
        tmp_path,
        {"ehr-database": {"url": URL, "query": "SELECT a,\n\tb\nFROM t -- ours\n"}},
    )
    site = SiteConfig.from_toml(path)
    assert "\n\tb\n" in site.data.ehr_database.query
