"""A path a command cannot use (a file where a folder goes, no permission) is a
configuration error that names it, not a traceback."""

from __future__ import annotations

import errno

from typer.testing import CliRunner

from wardround.cli import app
from wardround.cli_support import path_error


def test_an_out_folder_that_is_a_file_is_named(tmp_path):
    in_the_way = tmp_path / "results"
    in_the_way.write_text("not a folder")
    result = CliRunner().invoke(
        app, ["synth", "--sites", "1", "--patients", "10", "--out", str(in_the_way)]
    )
    assert result.exit_code == 2, result.output
    assert f"{in_the_way} is a file where a folder is needed" in result.output
    assert "Traceback" not in result.output
    assert in_the_way.read_text() == "not a folder"  # nothing overwritten


def test_permission_denied_names_the_path_and_the_account():
    error = path_error(
        PermissionError(errno.EACCES, "Permission denied", "/srv/site/.cache")
    )
    assert error.exit_code == 2
    assert "/srv/site/.cache: permission denied for the account" in error.message
    assert "data.cache-dir" in (error.hint or "")


def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path):
    result = CliRunner().invoke(
        app, ["synth", "--sites", "1", "--seed", "-1", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2 and not (tmp_path / "s").exists()


def test_simulate_writes_where_the_config_says_unless_out_is_given(tmp_path):
    from pathlib import Path

    from wardround.cli import _simulation_out
    from wardround.common.config import RunConfig

    own = RunConfig().with_overrides(output={"dir": str(tmp_path / "mine")})
    assert _simulation_out(None, own) == tmp_path / "mine"
    assert _simulation_out(tmp_path / "flag", own) == tmp_path / "flag"
    assert _simulation_out(None, RunConfig()) == Path("runs/simulate")


def test_a_bad_option_value_is_named_by_its_option_and_a_bad_file_value_by_its_key(
    tmp_path,
):
    out = ["--out", str(tmp_path / "run")]
    by_flag = CliRunner().invoke(app, ["simulate", "--rounds", "20000", *out])
    assert by_flag.exit_code == 2
    assert "--rounds (federation.rounds): Input should be less than" in by_flag.output
    assert "Fix the values above" in by_flag.output
    eps = CliRunner().invoke(app, ["simulate", "--epsilon", "0", *out])
    assert "--epsilon (privacy.target-epsilon)" in eps.output
    run_toml = tmp_path / "run.toml"
    run_toml.write_text("[privacy]\ntarget-epsilon = -1\n")
    by_key = CliRunner().invoke(
        app, ["simulate", "--config", str(run_toml), "--epsilon", "2", *out]
    )
    assert by_key.exit_code == 2
    assert (
        "privacy.target-epsilon" in by_key.output and "--epsilon (" not in by_key.output
    )
    assert not (tmp_path / "run").exists()
