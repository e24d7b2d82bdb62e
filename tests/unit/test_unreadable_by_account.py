"""What site check and ingestion name instead of losing quietly: unreadable files and
folders, an EHR table the account may not read, a note column with no note.

The tests run as root in CI, where permissions do not stop a read: the refusal is
made by patching the calls that would raise PermissionError for another account.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from wardround.client.deid_export import deid_folder
from wardround.common.errors import DataError
from wardround.sitedata import decode
from wardround.sitedata.dicom_index import index_dicom
from wardround.sitedata.ehr_source import open_dataset

SALT = b"a-long-test-salt-0123456789"


@pytest.fixture
def archive(tmp_path) -> Path:
    src = tmp_path / "in"
    for folder in ("open", "locked"):
        (src / folder).mkdir(parents=True)
        shutil.copy(get_testdata_file("CT_small.dcm"), src / folder / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "open" / "mr.dcm")
    return src


def _deny_listing(monkeypatch, folder: Path) -> None:
    real = os.scandir

    def scandir(path="."):  # noqa: ANN001, ANN202 - os.scandir's signature
        if Path(os.fspath(path)).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _deny_reading(monkeypatch, file: Path) -> None:
    real = Path.open

    def open_(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.resolve() == file.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


def test_the_index_names_a_folder_it_may_not_list_and_a_file_it_may_not_read(
    archive, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    with monkeypatch.context() as denied:
        _deny_listing(denied, archive / "locked")
        _deny_reading(denied, archive / "open" / "mr.dcm")
        table = index_dicom([archive], cache, workers=1)
    status = dict(
        zip(table["path"].to_pylist(), table["status"].to_pylist(), strict=True)
    )
    assert status[str((archive / "locked").resolve())] == decode.FOLDER_NO_PERMISSION
    assert status[str((archive / "open" / "mr.dcm").resolve())] == decode.NO_PERMISSION
    assert status[str((archive / "open" / "ct.dcm").resolve())] == decode.OK
    # access granted since (size and mtime unchanged): read again, not the cached refusal
    again = index_dicom([archive], cache, workers=1)
    assert set(again["status"].to_pylist()) == {decode.OK}
    assert again.num_rows == 3


def test_deid_names_a_folder_it_may_not_list_and_exits_with_a_data_error(
    archive, tmp_path, monkeypatch
):
    from wardround.cli import app

    _deny_listing(monkeypatch, archive / "locked")
    result = deid_folder(archive, tmp_path / "out", SALT)
    assert result.unlisted_folders == ["locked"]
    assert result.files == 2 and result.written == 2
    done = CliRunner().invoke(
        app,
        [
            "site",
            "deid",
            "--in",
            str(archive),
            "--out",
            str(tmp_path / "out2"),
            "--salt",
            SALT.decode(),
        ],
    )
    assert done.exit_code == DataError.exit_code
    assert "NOT SEEN: 1 folder(s)" in done.output and "(locked)" in done.output


def test_an_ehr_table_it_may_not_read_says_so(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    table = tmp_path / "ehr.parquet"
    pq.write_table(pa.table({"patient_id": ["p1"]}), table)

    def denied(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise PermissionError(errno.EACCES, "Permission denied", str(table))

    monkeypatch.setattr(pads, "dataset", denied)
    with pytest.raises(DataError) as err:
        open_dataset(table)
    assert "may not read" in err.value.message and str(table) in err.value.message
    assert "read access" in err.value.hint
    assert "not readable Parquet" not in err.value.message


def test_site_check_warns_with_what_to_give_the_account():
    from wardround.client.site_check import _permission_warnings

    none = {"not_usable": {decode.UNREADABLE: 4}, "decode_failures": {}}
    assert _permission_warnings(none) == []
    [files_only] = _permission_warnings(
        {"not_usable": {decode.NO_PERMISSION: 2}, "decode_failures": {}}
    )
    assert "may not read 2 DICOM file(s): their images" in files_only
    assert "folder" not in files_only
    [both] = _permission_warnings(
        {
            "not_usable": {decode.NO_PERMISSION: 2, decode.FOLDER_NO_PERMISSION: 1},
            "decode_failures": {decode.NO_PERMISSION: 1},
        }
    )
    assert "may not read 3 DICOM file(s) and may not list 1 folder(s)" in both
    assert "read access" in both


def test_site_check_says_when_no_study_has_a_note():
    from wardround.client.site_check import _no_notes

    assert _no_notes({"items": 10, "items_with_note": 3}, "note") == []
    assert _no_notes({"items": 0, "items_with_note": 0}, "note") == []
    [warning] = _no_notes({"items": 10, "items_with_note": 0}, "clinical_note")
    assert "'clinical_note' is missing or empty in every row" in warning
    assert '[ehr] note = "THAT_COLUMN"' in warning
    [undeclared] = _no_notes({"items": 10, "items_with_note": 0}, None)
    assert "declares no note column" in undeclared
