"""A 2-site, 2-round simulation: one site reads its hospital's servers, one its files."""

from __future__ import annotations

import json
import shutil

import pytest
from orthanc_server import OrthancServer
from postgres_server import READER, Postgres

from wardround.client.site_check import check_site
from wardround.simulations.hospital_servers import (
    load_ehr_into_postgres,
    write_server_site_toml,
)

pytestmark = pytest.mark.integration


def test_a_site_on_its_servers_trains_beside_a_site_on_files(
    synthetic_sites, postgres: Postgres, orthanc: OrthancServer, tiny_config, tmp_path
):
    from wardround.simulations.runner import prepare_simulation, run_simulation_engine

    sites = tmp_path / "sites"
    shutil.copytree(synthetic_sites, sites)
    toml = sites / "site-01" / "site.toml"
    config = tiny_config.with_overrides(
        data={"sites_dir": str(sites)}, secure_aggregation={"enabled": False}
    )
    from_files = check_site(toml, config.task, image_size=32)
    table, _ = load_ehr_into_postgres(
        toml,
        postgres.url("admin"),
        postgres.admin_password,
        table="federation_site_01_ehr",
        grant_to=READER,
    )
    password = sites / "site-01" / "pg.password"
    password.write_text(postgres.reader_password)
    password.chmod(0o600)
    servers = write_server_site_toml(
        toml,
        database={
            "url": postgres.url(),
            "table": table,
            "password-file": password.name,
        },
    )
    servers.replace(toml)  # site-01 now reads its EHR from the database only
    (sites / "site-01" / "ehr.parquet").unlink()
    from_servers = check_site(toml, config.task, image_size=32)
    assert from_servers["fingerprint"] == from_files["fingerprint"]

    config, n_sites = prepare_simulation(
        config, out_dir=tmp_path / "run", sites=None, rounds=2
    )
    run_simulation_engine(config, n_sites)

    rounds = [
        json.loads(line)
        for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    ]
    trained = [
        sorted(t["site"] for t in r.get("train", [])) for r in rounds if r.get("train")
    ]
    assert trained == [["site-01", "site-02"], ["site-01", "site-02"]]
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(summary["final"]["sites"]) == {"site-01", "site-02"}
