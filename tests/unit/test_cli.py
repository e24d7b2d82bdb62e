"""The command line: clear messages and exit codes for user errors, no tracebacks."""

import shutil

import pyarrow.parquet as pq
from typer.testing import CliRunner

from wardround.cli import app
from wardround.ops.config_file import load_run_config

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_unknown_config_key_is_a_config_error(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[federation]\nrounds = 2\nlearning-rate = 0.1\n")
    code, out = _run(
        "simulate", "--config", str(config), "--out", str(tmp_path / "run")
    )
    assert code == 2
    assert "learning-rate: unknown key" in out and "rounds" in out
    assert "Traceback" not in out


def test_bad_value_names_the_key(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\nfusion = "attention"\n')
    code, out = _run(
        "simulate", "--config", str(config), "--out", str(tmp_path / "run")
    )
    assert code == 2 and "model.fusion" in out and "Traceback" not in out


def test_missing_sites_folder(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\nsites-dir = "{tmp_path / "nowhere"}"\n')
    code, out = _run(
        "simulate", "--config", str(config), "--out", str(tmp_path / "run")
    )
    assert code == 2 and "does not exist" in out and "Traceback" not in out


def test_missing_dicom_folder_and_missing_ehr_columns(synthetic_sites, tmp_path):
    sites = tmp_path / "sites"
    shutil.copytree(synthetic_sites, sites)
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\nsites-dir = "{sites}"\n')

    shutil.rmtree(sites / "site-01" / "dicom")
    code, out = _run(
        "simulate", "--config", str(config), "--out", str(tmp_path / "run")
    )
    assert code == 3 and "DICOM folder" in out and "data.dicom-dirs" in out

    shutil.copytree(synthetic_sites / "site-01" / "dicom", sites / "site-01" / "dicom")
    ehr = sites / "site-01" / "ehr.parquet"
    table = pq.read_table(ehr)
    pq.write_table(table.drop_columns(["crp", "bnp"]), ehr)
    code, out = _run(
        "simulate", "--config", str(config), "--out", str(tmp_path / "run")
    )
    assert code == 3
    assert "'crp'" in out and "'bnp'" in out and "[ehr.features]" in out
    assert "Traceback" not in out


def test_simulate_with_two_sites_asks_for_a_third_or_no_secagg(
    synthetic_sites, tmp_path
):
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\nsites-dir = "{synthetic_sites}"\n')
    code, out = _run(
        "simulate", "--config", str(config), "--out", str(tmp_path / "run")
    )
    assert code == 2 and "Traceback" not in out
    assert "needs at least 3 sites" in out and "--no-secagg" in out
    code, out = _run("simulate", "--sites", "2", "--out", str(tmp_path / "synth"))
    assert code == 2 and "this simulation has 2" in out
    assert not (tmp_path / "synth" / "sites").exists()  # refused before writing


def test_synth_writes_sites(tmp_path):
    code, out = _run(
        "synth", "--sites", "2", "--patients", "12", "--out", str(tmp_path / "s")
    )
    assert code == 0
    assert (tmp_path / "s" / "site-01" / "site.toml").is_file()
    assert (tmp_path / "s" / "site-02" / "ehr.parquet").is_file()


def test_synth_writes_image_less_sites(tmp_path):
    code, out = _run(
        "synth",
        "--sites",
        "2",
        "--patients",
        "12",
        "--image-less-sites",
        "2",
        "--out",
        str(tmp_path / "s"),
    )
    assert code == 0, out
    for name in ("site-01", "site-02"):
        assert (tmp_path / "s" / name / "ehr.parquet").is_file()
        assert not (tmp_path / "s" / name / "dicom").exists()
        assert "dicom-dirs" not in (tmp_path / "s" / name / "site.toml").read_text()


def test_simulate_patients_sizes_the_synthetic_sites(tmp_path, monkeypatch):
    from wardround.simulations import runner as runner_mod

    seen = {}

    def stop_here(config, **kwargs):
        seen["patients"] = config.data.patients_per_site
        raise KeyError("stop before the simulation")

    monkeypatch.setattr(runner_mod, "prepare_simulation", stop_here)
    result = runner.invoke(app, ["simulate", "--patients", "40", "--out", "x"])
    assert isinstance(result.exception, KeyError)
    assert seen["patients"] == 40


def test_simulate_patients_is_refused_with_real_sites(synthetic_sites, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\nsites-dir = "{synthetic_sites}"\n')
    code, out = _run(
        "simulate", "--patients", "40", "--config", str(config), "--no-secagg"
    )
    assert code == 2 and "--patients" in out and "data.sites-dir" in out
    code, out = _run("simulate", "--patients", "5")
    assert code == 2  # typer: at least 10


def test_synthetic_sites_are_written_again_when_their_size_changes(tmp_path):
    from wardround.simulations.runner import synthetic_sites

    sites = tmp_path / "sites"
    synthetic_sites(sites, 2, 12, 0)
    ehr = sites / "site-01" / "ehr.parquet"
    first = ehr.stat().st_mtime_ns

    synthetic_sites(sites, 2, 12, 0)  # the same settings: reused
    assert ehr.stat().st_mtime_ns == first

    synthetic_sites(sites, 1, 20, 0)  # other settings: written again
    assert sorted(p.parent.name for p in sites.glob("*/site.toml")) == ["site-01"]
    assert pq.read_metadata(ehr).num_rows > 12


def test_config_prints_a_toml_that_parses_back(tmp_path):
    from wardround.common.config import RunConfig

    code, out = _run("config")
    assert code == 0
    path = tmp_path / "printed.toml"
    path.write_text(out)
    assert load_run_config(path) == RunConfig()
