"""`wardround synth` loads a hospital into PostgreSQL and Orthanc; the site reads both.

`site check` from the servers equals `site check` from the files, fingerprint
included; a second check fetches nothing; a PACS that is down stops the site
with its name and the reason.
"""

from __future__ import annotations

import tomllib

import pytest
import tomli_w
from orthanc_server import OrthancServer, free_port, instance_count
from postgres_server import READER, Postgres
from typer.testing import CliRunner

from wardround.cli import app
from wardround.client.site_check import check_site
from wardround.common.config import RunConfig

TASK = RunConfig().task


@pytest.fixture(scope="module")
def hospital(postgres: Postgres, orthanc: OrthancServer, tmp_path_factory):
    """One synthetic hospital, written to files and loaded into both servers."""
    root = tmp_path_factory.mktemp("hospital")
    result = CliRunner().invoke(
        app,
        [
            "synth", "--sites", "1", "--patients", "25", "--seed", "5",
            "--out", str(root),
            "--postgres", postgres.url("admin"), "--postgres-reader", READER,
            "--pacs", orthanc.dicomweb_url, "--pacs-user", orthanc.username,
        ],
        env={
            "PGPASSWORD": postgres.admin_password,
            "WARDROUND_PACS_PASSWORD": orthanc.password,
        },
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "stored" in result.output and "loaded" in result.output
    return root / "site-01"


@pytest.fixture
def server_passwords(monkeypatch, postgres: Postgres, orthanc: OrthancServer):
    monkeypatch.setenv("WARDROUND_EHR_PASSWORD", postgres.reader_password)
    monkeypatch.setenv("WARDROUND_PACS_PASSWORD", orthanc.password)


def test_site_check_from_the_servers_equals_site_check_from_the_files(
    hospital, orthanc, server_passwords
):
    stored = instance_count(orthanc)
    from_files = check_site(hospital / "site.toml", TASK)
    from_servers = check_site(hospital / "site-servers.toml", TASK)
    assert from_files["can_train"], from_files["blocking"]
    assert from_servers["can_train"], from_servers["blocking"]
    assert from_servers["fingerprint"] == from_files["fingerprint"]
    assert from_servers["ehr"] == from_files["ehr"]
    # The folder also holds studies no EHR row names; the PACS is asked only for
    # the EHR's. What trains is the same.
    used = ("items", "items_with_image", "items_with_ehr", "items_with_note",
            "patients", "ehr_studies", "ehr_studies_with_image")  # fmt: skip
    assert {k: from_servers["join"][k] for k in used} == {
        k: from_files["join"][k] for k in used
    }
    assert from_servers["join"]["dicom_coverage"] == 1.0
    assert from_servers["sources"]["ehr"].startswith("EHR database postgresql://")
    assert orthanc.dicomweb_url in from_servers["sources"]["images"]
    pacs = from_servers["pacs"]
    assert pacs["requested"] == from_files["join"]["ehr_studies"]
    assert pacs["instances_fetched"] == from_servers["dicom"]["files"] > 0
    # the EHR's studies without images: counted as not found, never dropped
    no_image = (
        from_files["join"]["ehr_studies"] - from_files["join"]["ehr_studies_with_image"]
    )
    assert pacs["not_complete"] == ({"not-found": no_image} if no_image else {})

    again = check_site(hospital / "site-servers.toml", TASK)
    assert again["fingerprint"] == from_files["fingerprint"]
    assert again["pacs"]["instances_fetched"] == 0
    assert again["pacs"]["cached"] == pacs["fetched"] + pacs["cached"]
    assert instance_count(orthanc) == stored  # the site only read


def test_a_pacs_that_is_down_blocks_the_site_naming_it(hospital, server_passwords):
    doc = tomllib.loads((hospital / "site-servers.toml").read_text())
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    doc["data"]["pacs"]["url"] = url
    toml = hospital / "site-down.toml"
    toml.write_text(tomli_w.dumps(doc))

    report = check_site(toml, TASK)

    assert not report["can_train"]
    assert any(url in b for b in report["blocking"]), report["blocking"]


def test_the_site_daemon_refuses_to_start_naming_the_source(
    hospital, server_passwords, tmp_path, monkeypatch
):
    from wardround.client.daemon import plan_site
    from wardround.common.errors import DataError
    from wardround.pki import generate_site_keypair, init_ca

    ca = init_ca(tmp_path / "ca")
    keys = generate_site_keypair("site-01", tmp_path / "keys")
    doc = tomllib.loads((hospital / "site-servers.toml").read_text())
    doc["deployment"] = {
        "coordinator": "127.0.0.1:9093",
        "root-certificate": str(ca.cert),
        "private-key": str(keys.private_key),
    }
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    cases = {
        "pacs": ({"pacs": {**doc["data"]["pacs"], "url": down}}, down),
        "database": ({}, "refused the credentials"),
    }
    for name, (data, expected) in cases.items():
        if name == "database":
            monkeypatch.setenv("WARDROUND_EHR_PASSWORD", "not-the-password")
        toml = hospital / f"site-daemon-{name}.toml"
        toml.write_text(tomli_w.dumps({**doc, "data": {**doc["data"], **data}}))
        with pytest.raises(DataError) as err:
            plan_site(toml)
        assert expected in str(err.value), str(err.value)
        assert "not-the-password" not in str(err.value)
