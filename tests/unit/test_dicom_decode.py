"""DICOM decoding breadth: pydicom's own test files, photometrics, frames, windows."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.data.data_manager import DATA_ROOT, online_test_file_dummy_paths
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from wardround.common.config import SliceMode
from wardround.sitedata import decode
from wardround.sitedata.decode import DecodeFailure
from wardround.sitedata.dicom_index import index_dicom
from wardround.sitedata.image import (
    WINDOW_PRESETS,
    combine_slices,
    load_study_image,
    pick_indices,
    preset_window,
    resize_to_square,
    to_unit,
)

TEST_ROOT = Path(DATA_ROOT) / "test_files"
#: files that pydicom ships broken on purpose, with the reason we must give
KNOWN_BAD = {
    "MR_truncated.dcm": decode.TRUNCATED,
    "badVR.dcm": decode.MISSING_ATTRIBUTE,
    "nested_priv_SQ.dcm": decode.MISSING_ATTRIBUTE,
    "meta_missing_tsyntax.dcm": decode.NO_TRANSFER_SYNTAX,
}
#: one file per compressed transfer syntax that must decode with the codecs
MUST_DECODE = [
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "JPGExtended.dcm",
    "JPEGLSNearLossless_16.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm",
    "MR_small_RLE.dcm",
    "image_dfl.dcm",
    "MR_small_bigendian.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
]
NATIVE = {
    "MR_small_RLE.dcm",
    "image_dfl.dcm",
    "MR_small_bigendian.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
}


def _local_test_files() -> list[Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # downloads fail offline; recorded below
        files = get_testdata_files()
    return sorted(Path(f) for f in files if os.path.isfile(f))


def _outcomes() -> dict[str, str]:
    out = {}
    for path in _local_test_files():
        name = (
            str(path.relative_to(TEST_ROOT)) if TEST_ROOT in path.parents else path.name
        )
        try:
            image = load_study_image([path], 16)
        except DecodeFailure as exc:
            out[name] = exc.reason
            continue
        assert image.shape == (1, 16, 16) and image.dtype == np.float32
        assert np.isfinite(image).all() and 0.0 <= image.min() and image.max() <= 1.0
        out[name] = "ok"
    return out


def _without_codecs(monkeypatch) -> None:
    """Simulate a machine without the codecs extra (and without Pillow/GDCM)."""
    from pydicom.pixels.decoders import base

    for uid in base._PIXEL_DATA_DECODERS:
        decoder = get_decoder(UID(uid))
        if not decoder.is_native:
            kept = {k: v for k, v in decoder._available.items() if k == "pydicom"}
            monkeypatch.setattr(decoder, "_available", kept)


@pytest.mark.parametrize("codecs", ["with", "without"])
def test_every_pydicom_test_file_decodes_or_has_a_reason(codecs, monkeypatch):
    if codecs == "with":
        for module in ("pylibjpeg", "libjpeg", "openjpeg", "rle", "jpeg_ls"):
            pytest.importorskip(module)
    else:
        _without_codecs(monkeypatch)
    outcomes = _outcomes()
    vocabulary = {
        v for k, v in vars(decode).items() if k.isupper() and isinstance(v, str)
    }
    assert len(outcomes) > 150
    assert set(outcomes.values()) <= vocabulary  # every reason is a named one
    for name, reason in KNOWN_BAD.items():
        assert outcomes[name] == reason, name
    assert (
        outcomes["CT_small.dcm"] == "ok" and outcomes["rtplan.dcm"] == decode.NO_PIXELS
    )
    assert outcomes["README.txt"] == decode.NOT_DICOM
    # no preamble and no file meta: still read as DICOM (they hold no pixels)
    assert outcomes["ExplVR_BigEndNoMeta.dcm"] == decode.NO_PIXELS
    for name in MUST_DECODE:
        if codecs == "with" or name in NATIVE:
            assert outcomes[name] == "ok", (name, outcomes[name])
        else:
            assert outcomes[name] == decode.NEEDS_CODEC, name
            assert "install wardround[codecs]" in outcomes[name]
    unavailable = sorted(
        set(online_test_file_dummy_paths().values()) - {Path(p).name for p in outcomes}
    )
    print(
        f"\n{codecs} codecs: {sum(v == 'ok' for v in outcomes.values())} decoded, "
        f"{len(outcomes)} local files, {len(unavailable)} downloadable files "
        f"unavailable offline: {', '.join(unavailable)}"
    )


def test_index_reports_missing_codec_at_header_time(tmp_path, monkeypatch):
    _without_codecs(monkeypatch)
    folder = tmp_path / "pacs"
    folder.mkdir()
    for name in ("JPEG2000.dcm", "CT_small.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    table = index_dicom([folder], tmp_path / "cache", workers=1)
    status = dict(
        zip(
            [Path(p).name for p in table.column("path").to_pylist()],
            table.column("status").to_pylist(),
            strict=True,
        )
    )
    assert status == {
        "JPEG2000.dcm": decode.NEEDS_CODEC,
        "CT_small.dcm": "ok",
        "notes.txt": decode.NOT_DICOM,
    }


def test_truncated_file_is_skipped_with_a_reason(tmp_path):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-3000])
    with pytest.raises(DecodeFailure) as err:
        load_study_image([cut], 16)
    assert err.value.reason == decode.TRUNCATED


def _multiframe(tmp_path: Path, n: int = 10) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base = ds.pixel_array.astype(np.int16)
    frames = np.stack([base // 4 + 40 * k for k in range(n)]).astype(np.int16)
    ds.NumberOfFrames = n
    ds.PixelData = frames.tobytes()
    path = tmp_path / "multiframe.dcm"
    ds.save_as(path)
    return path


def test_multiframe_modes(tmp_path):
    path = _multiframe(tmp_path)
    middle = load_study_image([path], 16, SliceMode.MIDDLE)
    mip = load_study_image([path], 16, SliceMode.MIP)
    chans = load_study_image([path], 16, SliceMode.CHANNELS, 3)
    assert middle.shape == mip.shape == (1, 16, 16) and chans.shape == (3, 16, 16)
    assert (mip >= middle - 1e-5).all() and mip.sum() > middle.sum()
    assert chans[0].mean() < chans[1].mean() < chans[2].mean()  # frame order kept
    rgb2 = load_study_image(
        [Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))], 8, SliceMode.CHANNELS, 2
    )
    assert rgb2.shape == (2, 8, 8)
    frames = np.random.default_rng(0).random((10, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(
        combine_slices(frames, SliceMode.MIP), frames.max(0)[None]
    )
    np.testing.assert_array_equal(
        combine_slices(frames, SliceMode.MIDDLE), frames[5][None]
    )
    assert pick_indices(10, SliceMode.CHANNELS, 3) == [1, 5, 8]
    assert pick_indices(3, SliceMode.CHANNELS, 3) == [0, 1, 2]
    assert pick_indices(1, SliceMode.CHANNELS, 3) == [0, 0, 0]


def test_multislice_series_in_slice_order(tmp_path):
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    paths = []
    for k, z in enumerate([30.0, 10.0, 20.0]):  # files not in slice order
        ds = base.copy()
        ds.ImagePositionPatient = [0.0, 0.0, z]
        arr = np.full((ds.Rows, ds.Columns), int(z) * 10, np.int16)
        ds.PixelData = arr.tobytes()
        ds.WindowCenter, ds.WindowWidth = 200.0, 400.0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        paths.append((z, tmp_path / f"s{k}.dcm"))
        ds.save_as(paths[-1][1])
    ordered = [p for _, p in sorted(paths)]
    chans = load_study_image(ordered, 8, SliceMode.CHANNELS, 3)
    np.testing.assert_allclose(chans[:, 4, 4], [0.25, 0.5, 0.75], atol=1e-5)
    middle = load_study_image(ordered, 8, SliceMode.MIDDLE)
    np.testing.assert_allclose(middle[0, 4, 4], 0.5, atol=1e-5)
    mip = load_study_image(ordered, 8, SliceMode.MIP)
    np.testing.assert_allclose(mip[0, 4, 4], 0.75, atol=1e-5)


def _palette(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    index = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 7, 0, 1
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = np.arange(256, dtype=np.uint16) * 257
    for colour, lut in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", ramp)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.tobytes())
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
    for kw in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    ds.PixelData = index.tobytes()
    path = tmp_path / "palette.dcm"
    ds.save_as(path)
    return path


def test_monochrome1_palette_and_ybr(tmp_path):
    from wardround.sitedata.image import frames_to_unit

    mono1 = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ref = load_study_image([Path(get_testdata_file("MR_small.dcm"))], 16)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    inv = resize_to_square(frames_to_unit(mono1, mono1.pixel_array), 16)
    np.testing.assert_allclose(inv, 1.0 - ref, atol=1e-4)
    palette = load_study_image([_palette(tmp_path)], 16)
    ybr = load_study_image([Path(get_testdata_file("SC_rgb_dcmtk_+eb+cy+n1.dcm"))], 16)
    rgb = load_study_image([Path(get_testdata_file("SC_rgb_dcmtk_+eb+cr.dcm"))], 16)
    for image in (palette, ybr, rgb):
        assert image.shape == (1, 16, 16) and image.std() > 0.01
    np.testing.assert_allclose(ybr, rgb, atol=0.05)  # same picture, other encoding


def test_window_presets_and_file_window_first():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = np.array([40.0])
    ds.WindowCenter, ds.WindowWidth = 0.0, 100.0
    assert to_unit(hu, ds)[0] == pytest.approx(0.9)  # the file's own window
    del ds.WindowCenter, ds.WindowWidth
    ds.BodyPartExamined = "HEAD"
    assert preset_window("CT", "head") == WINDOW_PRESETS[("CT", "HEAD")] == (40.0, 80.0)
    assert to_unit(hu, ds)[0] == pytest.approx(0.5)
    ds.BodyPartExamined = "KNEE"
    assert preset_window("CT", "KNEE") == WINDOW_PRESETS[("CT", None)]
    assert preset_window("MR", "HEAD") is None


def test_spacing_aware_resize_keeps_aspect_and_pads():
    image = np.ones((1, 10, 20), np.float32)
    out = resize_to_square(image, 20)
    assert out.shape == (1, 20, 20)
    assert out[0, 10, :].min() > 0.99 and out[0, 0, :].max() == 0.0  # padded rows
    tall = resize_to_square(np.ones((1, 10, 10), np.float32), 20, spacing=(2.0, 1.0))
    assert tall[0, :, 10].min() > 0.99 and tall[0, 10, 0] == 0.0  # padded columns


def test_parallel_index_matches_serial(tmp_path, monkeypatch):
    from wardround.sitedata import dicom_index

    folder = tmp_path / "pacs"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    serial = index_dicom([folder], tmp_path / "c1", workers=1)
    monkeypatch.setattr(dicom_index, "_PARALLEL_FROM", 1)
    monkeypatch.setattr(dicom_index, "_CHUNK", 1)
    parallel = index_dicom([folder], tmp_path / "c2", workers=2)
    assert parallel.equals(serial) and serial.num_rows == 4


def _enhanced(tmp_path: Path) -> Path:
    """Three frames of raw value 1064; rescale and window only in functional groups."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for kw in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    ds.NumberOfFrames = 3
    ds.PixelRepresentation = 1
    ds.PixelData = np.full((3, ds.Rows, ds.Columns), 1064, np.int16).tobytes()
    rescale, voi, shared = Dataset(), Dataset(), Dataset()
    rescale.RescaleIntercept, rescale.RescaleSlope = -1024, 1  # → 40 HU
    voi.WindowCenter, voi.WindowWidth = 0, 400  # 40 HU → 0.6
    shared.PixelValueTransformationSequence = Sequence([rescale])
    shared.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    last_voi, last = Dataset(), Dataset()
    last_voi.WindowCenter, last_voi.WindowWidth = 200, 400  # this frame: 40 HU → 0.1
    last.FrameVOILUTSequence = Sequence([last_voi])
    ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset(), Dataset(), last])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    return path


def test_an_enhanced_images_rescale_and_window_come_from_its_functional_groups(
    tmp_path,
):
    from wardround.sitedata.image import load_unit_frames

    frames, _ = load_unit_frames(_enhanced(tmp_path))
    np.testing.assert_allclose(frames[:, 5, 5], [0.6, 0.6, 0.1], atol=1e-5)


@pytest.mark.parametrize("damage", ["palette without its table", "slope not a number"])
def test_a_header_the_decoder_accepts_but_display_cannot_use_is_a_reason(
    tmp_path, damage
):
    """Not a crash of site check or training: the study keeps its EHR and note."""
    if damage == "palette without its table":
        path = _palette(tmp_path)
        ds = pydicom.dcmread(path)
        for colour in ("Red", "Green", "Blue"):
            delattr(ds, f"{colour}PaletteColorLookupTableData")
        ds.save_as(path)
    else:
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.RescaleSlope = "7.77"
        path = tmp_path / "slope.dcm"
        ds.save_as(path)
        path.write_bytes(path.read_bytes().replace(b"7.77", b"abc "))
    with pytest.raises(DecodeFailure) as err:
        load_study_image([path], 16)
    assert err.value.reason == decode.DISPLAY_ERROR
