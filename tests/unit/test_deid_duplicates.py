"""`site deid` accounts for every input file; duplicate instances are used once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import typer
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from wardround.client.cli import site_app
from wardround.client.deid_export import deid_folder
from wardround.common.errors import ConfigError
from wardround.sitedata import dicom_warnings
from wardround.sitedata.dicom_index import index_dicom
from wardround.sitedata.join import duplicate_instances, study_series

runner = CliRunner()
SALT = b"a-long-test-salt-0123456789"
MR_SOP = "1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"

# one MR instance four times: truncated (first in path order), the original, a copy
# in another transfer syntax, and a re-send of the original; two files without a
# SOPInstanceUID (which once shared one output name); one file that is not DICOM
LAYOUT = {
    "a/MR_truncated.dcm": "MR_truncated.dcm",
    "b/MR_small.dcm": "MR_small.dcm",
    "c/MR_small_implicit.dcm": "MR_small_implicit.dcm",
    "d/MR_small.dcm": "MR_small.dcm",
    "e/no_meta_group_length.dcm": "no_meta_group_length.dcm",
    "e/priv_SQ.dcm": "priv_SQ.dcm",
}


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(site_app, name="site")
    return app


@pytest.fixture
def archive(tmp_path) -> Path:
    src = tmp_path / "in"
    for target, name in LAYOUT.items():
        (src / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), src / target)
    (src / "junk.bin").write_bytes(b"\x00" * 64)
    return src


def test_every_input_file_is_written_a_duplicate_or_failed(archive, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.jsonl"

    result = deid_folder(archive, out, SALT, report=report)

    assert result.files == 7
    assert result.written + result.duplicates + sum(result.failed.values()) == 7
    assert (result.written, result.duplicates) == (3, 3)
    assert result.failed == {"not DICOM (no DICOM header)": 1}
    # nothing was overwritten: one output file per file written
    assert len([p for p in out.rglob("*") if p.is_file()]) == result.written
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    by_source = {line["source"]: line for line in lines}
    assert sorted(by_source) == sorted([*LAYOUT, "junk.bin"])
    # the rule: a usable header first (not the truncated file), then path order
    assert by_source["b/MR_small.dcm"]["status"] == "written"
    for dup in ("a/MR_truncated.dcm", "c/MR_small_implicit.dcm", "d/MR_small.dcm"):
        assert by_source[dup] == {
            "source": dup,
            "status": "duplicate",
            "duplicate_of": "b/MR_small.dcm",
        }
    written = {line["output"] for line in lines if line["status"] == "written"}
    assert len(written) == 3
    assert all((out / o).is_file() for o in written)
    assert by_source["junk.bin"]["reason"] == "not DICOM (no DICOM header)"


def test_a_second_export_into_a_folder_that_holds_files_is_refused(archive, tmp_path):
    first = deid_folder(archive, tmp_path / "out", SALT)
    before = sorted((tmp_path / "out").rglob("*"))

    # another salt would leave each image twice, under two pseudonyms
    with pytest.raises(ConfigError, match="not an empty folder"):
        deid_folder(archive, tmp_path / "out", SALT + b"-other")

    assert sorted((tmp_path / "out").rglob("*")) == before
    assert Path(first.report) == tmp_path / "out.deid-report.jsonl"


def test_an_empty_out_folder_is_used(archive, tmp_path):
    (tmp_path / "out").mkdir()

    result = deid_folder(archive, tmp_path / "out", SALT)

    assert result.written == 3


def test_the_report_never_goes_into_the_shared_copy(archive, tmp_path):
    with pytest.raises(ConfigError, match="outside --in and --out"):
        deid_folder(archive, tmp_path / "out", SALT, report=tmp_path / "out" / "r")


def test_deid_cli_prints_the_account_and_no_pydicom_warning(archive, tmp_path):
    shutil.copy(get_testdata_file("badVR.dcm"), archive / "badVR.dcm")

    # the real entry point, as a terminal sees it (logging configured, stderr kept)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "wardround.cli",
            "site",
            "deid",
            "--in",
            str(archive),
            "--out",
            str(tmp_path / "out"),
            "--salt",
            SALT.decode(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # pydicom printed nothing
    assert done.stdout.startswith("8 input file(s): 4 de-identified")
    assert "3 duplicate(s)" in done.stdout and "1 failed" in done.stdout
    assert "Invalid value for VR IS: '…'" in done.stdout  # counted by kind
    assert "'1A'" not in done.stdout  # the header value itself never shows
    report = (tmp_path / "out.deid-report.jsonl").read_text()
    assert "badVR.dcm" in report and "VR IS" in report  # kept, file by file


def test_training_and_site_check_use_each_instance_once(archive, tmp_path):
    index = index_dicom([archive], tmp_path / "cache", workers=1)

    images = study_series(index)

    rows = [r for study in images.values() for r in study if r["sop_uid"] == MR_SOP]
    assert [Path(r["path"]).relative_to(archive).as_posix() for r in rows] == [
        "b/MR_small.dcm"
    ]
    # MR_small, its implicit-VR copy and its re-send are usable; the truncated is not
    assert duplicate_instances(index) == 2


def test_capture_counts_a_logged_and_warned_message_once_and_masks_values():
    from pydicom.misc import warn_and_log

    with dicom_warnings.capture() as kinds:
        warn_and_log("Invalid value for VR UI: '1.2.3.4'. Please see <https://x> ok.")
    with warnings.catch_warnings(record=True) as others:
        warnings.simplefilter("always")
        with dicom_warnings.capture() as none:
            warnings.warn("not pydicom's", UserWarning, stacklevel=1)

    assert kinds == ["Invalid value for VR UI: '…'."]
    assert none == [] and [str(w.message) for w in others] == ["not pydicom's"]


def test_the_garbage_collectors_warnings_are_not_counted_as_a_files():
    import warnings

    from wardround.sitedata import dicom_warnings

    with warnings.catch_warnings(record=True) as passed_on:
        warnings.simplefilter("always")
        with dicom_warnings.capture() as kinds:
            # an unclosed socket collected while pydicom's code runs
            warnings.warn_explicit(
                ResourceWarning("unclosed <ssl.SSLSocket fd=3>"),
                ResourceWarning,
                "/venv/site-packages/pydicom/filereader.py",
                1,
            )
            warnings.warn_explicit(
                UserWarning("Invalid value for VR UI"),
                UserWarning,
                "/venv/site-packages/pydicom/valuerep.py",
                1,
            )
    assert kinds == [dicom_warnings.warning_kind("Invalid value for VR UI")]
    assert [w.category for w in passed_on] == [ResourceWarning]
