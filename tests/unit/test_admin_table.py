"""Admin tables keep the identifiers operators copy whole, at 80 columns and piped."""

from __future__ import annotations

import io
import json

from coordinator_files import coordinator_config
from rich.console import Console
from typer.testing import CliRunner

from wardround.cli import app
from wardround.server.admin_table import FREE_TEXT_CHARS, print_admin_table

NODE_ID = "7227297669912345678"
RUN_NAME = "20261207-040812-4f37e74c"
REASON = (
    "the SuperNode of site-02 refused the run: app 4f37e74c is not approved at "
    "this site; approve it with `wardround site approve --run-config run.toml`\n"
    + "\n".join(f"  detail line {i}" for i in range(40))
)


def _printed(rows, columns, **kinds) -> str:
    out = io.StringIO()
    print_admin_table(
        rows, columns, console=Console(width=80, file=out, color_system=None), **kinds
    )
    return out.getvalue()


def test_sites_list_shows_the_whole_node_id_at_80_columns():
    rows = [
        {
            "site": "site-01",
            "node_id": NODE_ID,
            "state": "online",
            "online_at": "2026-12-07T04:01:31.123456+00:00",
            "enrolled_at": "2026-12-07T04:00:00+00:00",
            "revoked_at": None,
        }
    ]
    shown = _printed(
        rows,
        ["site", "node_id", "state", "online_at", "enrolled_at", "revoked_at"],
        identifiers={"site", "node_id"},
        times={"online_at", "enrolled_at", "revoked_at"},
    )
    assert NODE_ID in shown
    assert "2026-12-07" in shown and "04:01:31Z" in shown  # to the second, in UTC
    assert max(len(line) for line in shown.splitlines()) <= 80


def test_runs_table_keeps_the_run_name_and_cuts_the_reason_to_one_line():
    rows = [
        {"name": RUN_NAME, "state": "failed", "round": 1, "rounds": 3, "reason": REASON}
    ]
    shown = _printed(
        rows,
        ["name", "state", "round", "rounds", "reason", "launched_at"],
        identifiers={"name"},
        free_text={"reason"},
    )
    assert RUN_NAME in shown
    assert "detail line" not in shown
    assert len(shown.splitlines()) <= 6  # header, one row, borders


def test_a_free_text_cell_is_its_first_line_cut_to_a_limit_on_a_wide_console():
    out = io.StringIO()
    print_admin_table(
        [{"reason": REASON}],
        ["reason"],
        free_text={"reason"},
        console=Console(width=300, file=out),
    )
    [row] = [line for line in out.getvalue().splitlines() if "SuperNode" in line]
    assert row.strip("│ ").endswith("…")
    assert len(row.strip("│ ")) == FREE_TEXT_CHARS


def test_wardround_runs_piped_at_80_columns_shows_whole_names(tmp_path):
    coordinator = coordinator_config(tmp_path)
    run_dir = coordinator.runs_path / RUN_NAME
    run_dir.mkdir(parents=True)
    (run_dir / "launch.json").write_text(
        json.dumps({"name": RUN_NAME, "launched_at": "2026-12-07T04:08:12+00:00"})
    )
    (run_dir / "status.json").write_text(
        json.dumps({"state": "failed", "rounds": 3, "rounds_done": 1, "reason": REASON})
    )
    result = CliRunner().invoke(
        app,
        ["runs", "--coordinator", str(tmp_path / "coordinator.toml")],
        env={"COLUMNS": "80"},
    )
    assert result.exit_code == 0, result.output
    assert RUN_NAME in result.output
    assert len(result.output.splitlines()) < 10
    assert "`wardround runs NAME` shows it" in result.output  # the whole reason


def test_a_64_character_site_name_at_80_columns_drops_no_column():
    name = "university-hospital-of-somewhere-department-of-radiology-site-01"[:64]
    rows = [
        {
            "site": name,
            "node_id": NODE_ID,
            "state": "revoked",
            "online_at": None,
            "enrolled_at": "2026-12-07T04:00:00+00:00",
            "revoked_at": "2026-12-07T05:00:00+00:00",
        }
    ]
    shown = _printed(
        rows,
        ["site", "node_id", "state", "online_at", "enrolled_at", "revoked_at"],
        identifiers={"site", "node_id"},
        times={"online_at", "enrolled_at", "revoked_at"},
    )

    assert len(name) == 64 and name in shown and NODE_ID in shown
    assert "state: revoked" in shown and "revoked_at: 2026-12-07 05:00:00Z" in shown
