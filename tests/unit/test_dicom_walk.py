"""The DICOM folder walk and header classes: what index, site check and deid see.

Folder links that loop, names that are not UTF-8, broken links, headers cut off by
the end of the file and a codec installed after indexing.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEG2000

from wardround.client.deid_export import FAILED, WRITTEN, deid_folder
from wardround.sitedata import decode, dicom_index
from wardround.sitedata.dicom_index import (
    BROKEN_LINK,
    ends_inside_an_element,
    file_path,
    index_dicom,
    read_header,
    walk_files,
)
from wardround.sitedata.image import load_study_image

SALT = b"a-long-test-salt-0123456789"
linux_only = pytest.mark.skipif(
    sys.platform != "linux", reason="needs a file system that takes any byte in names"
)


def _ct(folder: Path, name: str = "ct.dcm", **attrs: object) -> Path:
    """A copy of pydicom's CT_small with new UIDs (one instance per call)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attrs.items():
        setattr(ds, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def _statuses(table) -> dict[str, str]:  # noqa: ANN001 - a pyarrow table
    return dict(
        zip(table["path"].to_pylist(), table["status"].to_pylist(), strict=True)
    )


@pytest.mark.timeout(30)
def test_a_link_to_a_parent_folder_is_listed_once_not_walked_forever(tmp_path):
    dicom = tmp_path / "dicom"
    _ct(dicom / "x" / "sub", "a.dcm")
    os.symlink("..", dicom / "x" / "sub" / "back")

    table = index_dicom([dicom], tmp_path / "cache", workers=1)

    assert _statuses(table) == {str((dicom / "x/sub/a.dcm").resolve()): decode.OK}
    assert list(walk_files(dicom)) == [dicom / "x" / "sub" / "a.dcm"]


def test_a_folder_reached_directly_and_by_a_link_keeps_its_own_path(tmp_path):
    dicom = tmp_path / "dicom"
    _ct(dicom / "z_real")
    os.symlink("z_real", dicom / "a_link")  # sorts first, listed last

    assert list(walk_files(dicom)) == [dicom / "z_real" / "ct.dcm"]


@linux_only
def test_a_name_that_is_not_utf8_is_indexed_and_its_path_opens_the_file(tmp_path):
    dicom = tmp_path / "dicom"
    folder = os.fsdecode(os.fsencode(dicom) + b"/M\xfcller")
    os.makedirs(folder)
    name = os.fsdecode(os.fsencode(folder) + b"/im\xe9.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), name)
    cache = tmp_path / "cache"

    table = index_dicom([dicom], cache, workers=1)
    again = index_dicom([dicom], cache, workers=1)  # from the cache, as written

    assert table["status"].to_pylist() == [decode.OK]
    stored = again["path"].to_pylist()[0]
    assert stored.startswith("file://") and "%FC" in stored
    assert file_path(stored).samefile(name)
    assert load_study_image([file_path(stored)], 16).shape == (1, 16, 16)


def test_deid_exports_the_files_under_a_folder_link_as_the_index_does(tmp_path):
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    _ct(src / "here")
    _ct(elsewhere, "linked.dcm")
    os.symlink(elsewhere, src / "linked")

    result = deid_folder(src, tmp_path / "out", SALT)
    index = index_dicom([src], tmp_path / "cache", workers=1)

    assert result.files == index.num_rows == 2
    assert result.written == 2
    assert sorted(o.source for o in result.outcomes) == [
        "here/ct.dcm",
        "linked/linked.dcm",
    ]


def test_a_broken_link_is_a_file_that_fails_in_index_and_deid(tmp_path):
    src = tmp_path / "in"
    _ct(src)
    os.symlink(tmp_path / "gone.dcm", src / "moved.dcm")
    os.symlink("looped.dcm", src / "looped.dcm")  # a link to itself

    index = index_dicom([src], tmp_path / "cache", workers=1)
    result = deid_folder(src, tmp_path / "out", SALT)

    statuses = _statuses(index)  # named by the links' own paths, not their targets
    assert statuses[str(src.resolve() / "moved.dcm")] == BROKEN_LINK
    assert statuses[str(src.resolve() / "looped.dcm")] == BROKEN_LINK
    assert read_header(src / "looped.dcm")["status"] == BROKEN_LINK
    by_source = {o.source: o.status for o in result.outcomes}
    assert by_source == {"ct.dcm": WRITTEN, "looped.dcm": FAILED, "moved.dcm": FAILED}
    assert result.files == 3 and result.failed == {BROKEN_LINK: 2}


def _cut(tmp_path: Path, source: str, length: int) -> Path:
    data = Path(get_testdata_file(source)).read_bytes()
    path = tmp_path / f"cut-{length}-{source}"
    path.write_bytes(data[:length])
    return path


def test_an_image_cut_off_inside_its_header_is_unreadable_not_a_non_image(
    tmp_path,
):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US\x02\x00")  # (0028,0010) Rows, 2 bytes
    inside_rows = _cut(tmp_path, "CT_small.dcm", rows + 9)
    at_600 = _cut(tmp_path, "CT_small.dcm", 600)

    assert read_header(at_600)["status"] == decode.UNREADABLE
    assert read_header(inside_rows)["status"] == decode.UNREADABLE

    src = tmp_path / "in"
    src.mkdir()
    at_600.rename(src / "cut.dcm")  # a copy would look whole: it is not written
    result = deid_folder(src, tmp_path / "out", SALT)
    assert result.written == 0 and result.failed == {decode.UNREADABLE: 1}


def test_an_image_cut_between_two_elements_before_rows_misses_attributes(tmp_path):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US\x02\x00")

    status = read_header(_cut(tmp_path, "CT_small.dcm", rows))["status"]

    assert status == decode.MISSING_ATTRIBUTE


@pytest.mark.parametrize("source", ["test-SR.dcm", "rtplan.dcm", "reportsi.dcm"])
def test_whole_files_without_pixels_stay_not_an_image(source):
    assert read_header(Path(get_testdata_file(source)))["status"] == decode.NO_PIXELS


def test_a_file_ending_inside_an_element_is_told_from_a_whole_one():
    data = Path(get_testdata_file("test-SR.dcm")).read_bytes()  # sequences inside
    whole = io.BytesIO(data)

    cut = [
        ends_inside_an_element(io.BytesIO(data[:n]), n, little=True, implicit=False)
        for n in (len(data) - 1, len(data) - 7, 700)
    ]

    assert not ends_inside_an_element(whole, len(data), little=True, implicit=False)
    assert cut == [True, True, True]


def test_a_file_waiting_for_a_codec_is_read_again_once_the_codec_is_there(
    tmp_path, monkeypatch
):
    decoder = get_decoder(JPEG2000)  # JPEG2000.dcm's transfer syntax
    if not decoder.is_available:
        pytest.skip("no JPEG 2000 decoder installed")
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    shutil.copy(get_testdata_file("JPEG2000.dcm"), dicom / "j2k.dcm")
    cache = tmp_path / "cache"
    reads: list[int] = []
    real_read = dicom_index._read_chunk

    def counting_read(chunk):  # noqa: ANN001, ANN202 - _read_chunk's signature
        reads.append(len(chunk))
        return real_read(chunk)

    monkeypatch.setattr(dicom_index, "_read_chunk", counting_read)
    with monkeypatch.context() as without:
        without.setattr(decoder, "_available", {})
        before = index_dicom([dicom], cache, workers=1)["status"].to_pylist()
        still = index_dicom([dicom], cache, workers=1)["status"].to_pylist()
        reads_without = len(reads)

    after = index_dicom([dicom], cache, workers=1)["status"].to_pylist()

    assert before == still == [decode.NEEDS_CODEC]
    assert reads_without == 1  # no codec yet: the cached row is reused
    assert after == [decode.OK]
