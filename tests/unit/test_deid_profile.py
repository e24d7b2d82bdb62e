"""`site deid`: the whole PS3.15 Basic Profile at every level, and an exact account.

Each test builds its files with pydicom in ``tmp_path`` and checks the bytes
written (a marker that must not survive) or the per-file report.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
import typer
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from wardround.client.cli import site_app
from wardround.client.deid import (
    PROFILE,
    deid_ehr,
    deidentify,
    id_pseudonym,
    profile_action,
)
from wardround.client.deid_export import (
    BURN_IN_UNDECLARED,
    BURNED_IN_DECLARED,
    MEDIA_DIRECTORY,
    NO_META_UIDS,
    NOT_WRITABLE,
    deid_folder,
)

SALT = b"a-long-test-salt-0123456789"
runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(site_app, name="site")
    return app


def _image(**attributes: object) -> Dataset:
    """CT_small with fresh instance UIDs (so files of one test never collide)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid() for _ in range(3)
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _export(src: Path, tmp_path: Path) -> tuple[object, dict[str, dict]]:
    report = tmp_path / "report.jsonl"
    result = deid_folder(src, tmp_path / "out", SALT, report=report)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    return result, {line["source"]: line for line in lines}


def _written_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((tmp_path / "out").rglob("*.dcm")))


# --- 1: every nesting level ---------------------------------------------------


def test_a_patient_id_inside_sequences_is_pseudonymised_like_the_top_level():
    ds = _image(PatientID="MRN-1")
    source = Dataset()
    source.PatientID = "NESTED-MRN-999"
    source.ReferencedSOPInstanceUID = generate_uid()
    ds.SourceImageSequence = [source]
    deeper, group = Dataset(), Dataset()
    deeper.PatientID = "MRN-1"
    group.ReferencedImageSequence = [deeper]
    ds.SharedFunctionalGroupsSequence = [group]

    deidentify(ds, SALT)

    assert ds.SourceImageSequence[0].PatientID == id_pseudonym("NESTED-MRN-999", SALT)
    nested = ds.SharedFunctionalGroupsSequence[0].ReferencedImageSequence[0]
    assert nested.PatientID == ds.PatientID == id_pseudonym("MRN-1", SALT)
    uid = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert uid.startswith("2.25.")  # the reference follows its source's pseudonym


def test_a_dicomdir_is_failed_as_a_media_directory_and_never_written(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(get_testdata_file("DICOMDIR"), src / "DICOMDIR")
    _save(_image(), src / "a.dcm")

    result, lines = _export(src, tmp_path)

    assert lines["DICOMDIR"] == {
        "source": "DICOMDIR",
        "status": "failed",
        "reason": MEDIA_DIRECTORY,
    }
    assert result.failed == {MEDIA_DIRECTORY: 1} and result.written == 1
    assert len([p for p in (tmp_path / "out").rglob("*") if p.is_file()]) == 1


# --- 2: the complete Table E.1-1 ----------------------------------------------

#: attributes the review found surviving; each value carries a marker
REVIEWED = {
    "ReasonForTheRequestedProcedure": "PHI-REASON fall at home",
    "RequestedProcedureComments": "PHI-RPC call wife",
    "StudyComments": "PHI-STUDYCOMMENTS vip",
    "PerformedStationName": "PHI-STATION",
    "ImagingServiceRequestComments": "PHI-ISRC anxious",
    "PatientTelecomInformation": "PHI-TELECOM 555",
    "RegionOfResidence": "PHI-REGION",
    "ClinicalTrialSubjectID": "PHI-TRIALSUBJECT",
    "VerifyingOrganization": "PHI-VERIFYINGORG",
    "ScheduledProcedureStepLocation": "PHI-SCHEDLOC",
    "PerformedLocation": "PHI-PERFLOC",
    "GPSMapDatum": "PHI-GPSMAPDATUM",
    "GPSAreaInformation": b"PHI-GPSAREA\0",
}


def test_every_attribute_the_review_found_is_gone_from_the_written_file(tmp_path):
    ds = _image(**REVIEWED)
    institution = Dataset()
    institution.CodeValue, institution.CodingSchemeDesignator = "PHI-INST", "L"
    institution.CodeMeaning = "PHI-INSTMEANING St Johns"
    ds.InstitutionCodeSequence = [institution]
    icon = Dataset()
    icon.Rows = icon.Columns = 8
    icon.BitsAllocated, icon.SamplesPerPixel = 8, 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.PixelData = b"PHI-ICON" * 8
    ds.IconImageSequence = [icon]
    ds.add_new(Tag(0xFFFC, 0xFFFC), "OB", b"PHI-PADDING")  # Data Set Trailing Padding
    src = tmp_path / "in"
    _save(ds, src / "a.dcm")

    result, _ = _export(src, tmp_path)

    assert result.written == 1
    written = _written_bytes(tmp_path)
    assert b"PHI-" not in written
    out = pydicom.dcmread(next((tmp_path / "out").rglob("*.dcm")))
    assert "IconImageSequence" not in out and "InstitutionCodeSequence" not in out
    for keyword in REVIEWED:  # removed, emptied, or a dummy (D)
        assert keyword not in out or "PHI-" not in str(out[keyword].value), keyword


def test_sr_free_text_in_the_content_sequence_is_gone(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(get_testdata_file("test-SR.dcm"), src / "sr.dcm")
    original = pydicom.dcmread(src / "sr.dcm")
    assert [e for e in original.iterall() if e.keyword == "TextValue"]  # has text

    _export(src, tmp_path)

    out = pydicom.dcmread(next((tmp_path / "out").rglob("*.dcm")))
    assert [e for e in out.iterall() if e.keyword == "TextValue"] == []


def test_dates_in_functional_groups_get_the_profile_dummy_and_pixels_keep(tmp_path):
    ds = _image(NumberOfFrames=1, StudyDate="20240301")
    content, frame = Dataset(), Dataset()
    content.FrameAcquisitionDateTime = "20240301123000"
    frame.FrameContentSequence = [content]
    ds.PerFrameFunctionalGroupsSequence = [frame]
    rescale, shared = Dataset(), Dataset()
    rescale.RescaleIntercept, rescale.RescaleSlope = -1024, 1
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]

    deidentify(ds, SALT)

    frame_content = ds.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0]
    assert frame_content.FrameAcquisitionDateTime == "19000101000000"
    assert ds.StudyDate == ""
    kept = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    assert (kept.RescaleIntercept, kept.RescaleSlope) == (-1024, 1)


def test_the_profile_is_the_whole_table_and_spares_what_training_reads():
    training = (
        "Modality",
        "BodyPartExamined",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "InstanceNumber",
        "ImagePositionPatient",
        "SliceLocation",
        "PhotometricInterpretation",
        "RescaleSlope",
        "RescaleIntercept",
        "WindowCenter",
        "WindowWidth",
        "PixelData",
        "SOPClassUID",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "PixelValueTransformationSequence",
        "FrameVOILUTSequence",
        "BurnedInAnnotation",
    )

    assert len(PROFILE) > 600  # Table E.1-1 lists ~650 attributes, not a handful
    for keyword in training:
        assert profile_action(Tag(keyword), "") is None, keyword
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert profile_action(Tag(keyword), "UI") == "U"
    assert profile_action(Tag("PatientID"), "LO") == "D"  # the EHR join key
    assert profile_action(Tag(0x6002, 0x3000), "OW") == "X"  # an overlay


# --- 3: blank ids -------------------------------------------------------------


def test_blank_ehr_ids_stay_null_are_counted_and_match_the_dicom_side(tmp_path):
    src, dst = tmp_path / "ehr.parquet", tmp_path / "ehr-deid.parquet"
    table = {
        "patient_id": ["A1", "", "  ", None],
        "study_uid": ["1.2.3", "1.2.4", " ", ""],
    }
    pq.write_table(pa.table(table), src)
    dicom = _image(PatientID="  ")

    result = deid_ehr(src, dst, SALT)
    deidentify(dicom, SALT)

    rows = pq.read_table(dst).to_pylist()
    assert [r["patient_id"] for r in rows][1:] == [None, None, None]
    assert rows[0]["patient_id"] == id_pseudonym("A1", SALT)
    assert [r["study_uid"] is None for r in rows] == [False, False, True, True]
    assert result.rows == 4
    assert result.missing_ids == {"study_uid": 2, "patient_id": 3}
    assert dicom.PatientID == ""  # blank on the DICOM side too, not a pseudonym


def test_deid_cli_counts_and_prints_the_rows_without_an_id(tmp_path):
    src = tmp_path / "in"
    _save(_image(), src / "a.dcm")
    ehr = tmp_path / "ehr.parquet"
    pq.write_table(pa.table({"study_uid": ["1.2.3", ""], "patient_id": ["", "B"]}), ehr)
    args = ["site", "deid", "--in", str(src), "--salt", SALT.decode()]
    args += ["--ehr", str(ehr)]

    as_json = runner.invoke(
        _app(),
        [*args, "--out", str(tmp_path / "o1"), "--ehr-out", str(tmp_path / "e1")]
        + ["--json"],
    )
    as_text = runner.invoke(
        _app(),
        [*args, "--out", str(tmp_path / "o2"), "--ehr-out", str(tmp_path / "e2")],
    )

    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.output)
    assert summary["ehr_missing_ids"] == {"study_uid": 1, "patient_id": 1}
    assert "1 row(s) with no patient_id (null or blank): left null" in as_text.output


# --- 4: burned-in annotation, file by file -------------------------------------


def test_the_report_marks_which_files_to_review_for_burned_in_text(tmp_path):
    src = tmp_path / "in"
    _save(_image(Modality="US", BurnedInAnnotation="YES"), src / "declared.dcm")
    _save(_image(Modality="US"), src / "undeclared.dcm")
    _save(_image(Modality="US", BurnedInAnnotation="NO"), src / "says_none.dcm")
    _save(_image(), src / "ct.dcm")

    result, lines = _export(src, tmp_path)

    assert lines["declared.dcm"]["burned_in"] == BURNED_IN_DECLARED
    assert lines["undeclared.dcm"]["burned_in"] == BURN_IN_UNDECLARED
    assert "burned_in" not in lines["says_none.dcm"]
    assert "burned_in" not in lines["ct.dcm"]
    assert (result.burned_in, result.burn_in_undeclared) == (1, 1)


# --- 6: why a file could not be written -----------------------------------------


@pytest.mark.parametrize("name", ["empty_charset_LEI.dcm", "nested_priv_SQ.dcm"])
def test_a_file_without_sop_uids_fails_for_that_reason(tmp_path, name):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(get_testdata_file(name), src / name)

    result, lines = _export(src, tmp_path)

    assert lines[name]["reason"] == NO_META_UIDS
    assert result.failed == {NO_META_UIDS: 1}


def test_a_system_error_on_write_is_named_by_the_system(tmp_path, monkeypatch):
    src = tmp_path / "in"
    _save(_image(), src / "a.dcm")

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/some/where")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", full_disk)
    result, lines = _export(src, tmp_path)

    reason = f"{NOT_WRITABLE}: {os.strerror(errno.ENOSPC)}"
    assert lines["a.dcm"]["reason"] == reason and result.failed == {reason: 1}


# --- 7: a warning counted once per file -----------------------------------------


def test_a_warning_of_the_header_and_the_full_read_counts_once(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(get_testdata_file("badVR.dcm"), src / "badVR.dcm")

    result, lines = _export(src, tmp_path)

    kind = "Invalid value for VR IS: '…'."
    # the full read also meets a bad UID the header read skips: a kind of its own
    assert lines["badVR.dcm"]["warnings"].count(kind) == 1
    assert len(set(lines["badVR.dcm"]["warnings"])) == len(
        lines["badVR.dcm"]["warnings"]
    )
    assert result.pydicom_warnings[kind] == 1


def test_the_preamble_the_file_meta_and_free_text_beyond_the_table_are_gone(tmp_path):
    """What the review found after the table: bytes and text no attribute rule covers."""
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.preamble = b"MARK-PREAMBLE".ljust(128, b"\x00")
    ds.file_meta.SourceApplicationEntityTitle = "MARK_AE"
    ds.file_meta.add_new(
        (0x0002, 0x0100), "UI", "1.2.3"
    )  # PrivateInformationCreatorUID
    ds.file_meta.add_new((0x0002, 0x0102), "OB", b"MARK-PRIVATE-INFO")
    modifier = Dataset()
    modifier.ValueType, modifier.TextValue = "TEXT", "MARK_DEPTH3"
    context = Dataset()
    context.ValueType, context.TextValue = "TEXT", "MARK_DEPTH2"
    context.ContentItemModifierSequence = Sequence([modifier])
    protocol = Dataset()
    protocol.CodeValue, protocol.CodingSchemeDesignator = "1", "L"
    protocol.ProtocolContextSequence = Sequence([context])
    ds.PerformedProtocolCodeSequence = Sequence([protocol])
    src = tmp_path / "in"
    src.mkdir()
    ds.save_as(src / "ct.dcm")

    result = deid_folder(src, tmp_path / "out", SALT)

    assert result.written == 1
    [written] = list((tmp_path / "out").rglob("*.dcm"))
    data = written.read_bytes()
    assert b"MARK" not in data
    assert data[:128] == b"\x00" * 128
    again = pydicom.dcmread(written)
    assert "SourceApplicationEntityTitle" not in again.file_meta
    assert again.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
