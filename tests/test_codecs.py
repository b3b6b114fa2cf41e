"""Every transfer syntax a CT archive uses, on real slices nobody here wrote (pydicom-data's), through ingest and the
served model's reader; and the frame-size check that runs before any decoder allocates."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom import uid
from pydicom.pixels import apply_rescale

from blendsign import codecs
from blendsign.config import IngestConfig
from blendsign.dicom import UnusableFileError, read_header, read_hu
from blendsign.ingest import decode_hu, ingest, locate
from blendsign.serving import RowError, read_slice
from tests.conftest import real_file

CFG = replace(IngestConfig(), min_age_years=0.0, workers=1)
HEAD = "693_UNCI.dcm"  # pydicom-data: a 512² head-CT slice, 14-bit signed, explicit VR little endian
SPIRAL = "bad_sequence.dcm"  # pydicom-data: a Siemens spiral CT slice stored as JPEG Lossless SV1, 12-bit

LOSSLESS = [uid.ExplicitVRBigEndian, uid.DeflatedExplicitVRLittleEndian, uid.RLELossless, uid.JPEGLossless,
            uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEG2000Lossless]  # fmt: skip
# lossy syntaxes, as codecs.transcode encodes them, and the largest and mean |HU error| each may make: JPEG-LS
# near-lossless bounds every sample's error by NEAR (3) by construction; JPEG 2000 at 20:1 and 12-bit JPEG at
# quality 90 have no such bound: measured 14 and 8 HU at most, mean 1.2 and 0.8 HU on these slices.
LOSSY = {
    uid.JPEGLSNearLossless: (HEAD, 3, 3.0),
    uid.JPEG2000: (HEAD, 20, 2.0),
    uid.JPEGExtended12Bit: (SPIRAL, 16, 1.5),
}


def reference_hu(name: str) -> np.ndarray:
    ds = pydicom.dcmread(real_file(name))
    return np.asarray(apply_rescale(ds.pixel_array, ds)).astype(np.int16)


def uncompressed(name: str, tmp_path: Path) -> Path:
    """pydicom-data's file, decompressed to explicit VR little endian (the source every encoding starts from)."""
    ds = pydicom.dcmread(real_file(name))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    path = tmp_path / f"{name}.native"
    ds.save_as(path)
    return path


def ingested_hu(src: Path, out: Path) -> np.ndarray:
    result = ingest(src, out, CFG, progress=False)
    assert not result.report["quarantined"], result.report["quarantined"]
    (row,) = pq.read_table(out / "slices").to_pylist()
    return decode_hu(row["hu"], row["rows"], row["cols"])


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.name)
def test_a_real_head_slice_in_every_lossless_syntax_ingests_and_serves_to_the_same_hu(tmp_path: Path, syntax: uid.UID)\
        -> None:
    src = tmp_path / "src"
    src.mkdir()
    codecs.transcode(uncompressed(HEAD, tmp_path), src / "slice", syntax)
    assert pydicom.dcmread(src / "slice").file_meta.TransferSyntaxUID == syntax
    expected = reference_hu(HEAD)
    np.testing.assert_array_equal(ingested_hu(src, tmp_path / "out"), expected)
    np.testing.assert_array_equal(read_slice((src / "slice").read_bytes()), expected)  # the served model's reader


@pytest.mark.parametrize("syntax", list(LOSSY), ids=lambda s: s.name)
def test_lossy_syntaxes_ingest_within_their_stated_tolerance(tmp_path: Path, syntax: uid.UID) -> None:
    name, max_error, mean_error = LOSSY[syntax]
    src = tmp_path / "src"
    src.mkdir()
    codecs.transcode(uncompressed(name, tmp_path), src / "slice", syntax)
    error = np.abs(ingested_hu(src, tmp_path / "out").astype(np.int32) - reference_hu(name))
    assert 0 < error.max() <= max_error and error.mean() < mean_error  # lossy indeed, and close
    np.testing.assert_array_equal(read_slice((src / "slice").read_bytes()), ingested_hu(src, tmp_path / "again"))


def test_the_siemens_jpeg_lossless_slice_ingests_exactly_as_pydicom_decodes_it_with_gdcm(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(real_file(SPIRAL), src / "spiral")
    ds = pydicom.dcmread(real_file(SPIRAL))
    assert ds.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
    ds.pixel_array_options(decoding_plugin="gdcm")
    expected = np.asarray(apply_rescale(ds.pixel_array, ds)).astype(np.int16)
    np.testing.assert_array_equal(ingested_hu(src, tmp_path / "out"), expected)
    assert int(expected.max()) - int(expected.min()) > 1000  # a real image, not a blank one


def test_twelve_bit_jpeg_extended_is_decoded_by_the_gdcm_plugin() -> None:
    from pydicom.pixels.decoders import JPEGExtended12BitDecoder

    assert codecs.PLUGIN in JPEGExtended12BitDecoder.available_plugins
    assert not codecs.is_available(uid.JPEGLossless)  # only the syntax pydicom's own GDCM plugin declines


# --- the declared size, checked before decoding -----------------------------------------------------------------


def j2k_frame_with_size(tmp_path: Path, rows: int, cols: int) -> tuple[Path, bytes]:
    """A 128×128 JPEG 2000 file whose codestream's SIZ marker is rewritten to declare ``rows × cols``."""
    ds = pydicom.dcmread(real_file(HEAD))
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:128, :128]).tobytes()
    ds.Rows = ds.Columns = 128
    ds.compress(uid.JPEG2000Lossless, generate_instance_uid=False)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    assert codecs.declared_size(frame) == (128, 128)
    at = frame.find(b"\xff\x4f\xff\x51") + 4
    siz = bytearray(frame)
    siz[at + 4 : at + 12] = cols.to_bytes(4, "big") + rows.to_bytes(4, "big")  # Xsiz, Ysiz (offsets are 0)
    ds.PixelData = pydicom.encaps.encapsulate([bytes(siz)])
    path = tmp_path / "bomb.dcm"
    ds.save_as(path)
    return path, bytes(siz)


def test_a_jpeg2000_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path: Path) -> None:
    path, frame = j2k_frame_with_size(tmp_path, 16384, 16384)
    assert codecs.declared_size(frame) == (16384, 16384) and path.stat().st_size < 64_000
    reason = "declares 16384x16384 pixels but the DICOM header says 128x128"
    with pytest.raises(UnusableFileError, match=reason):
        read_hu(path, read_header(path).pixels)
    with pytest.raises(RowError, match=reason):
        read_slice(path.read_bytes())


def test_declared_sizes_of_jpeg_and_jpeg_ls_frames(tmp_path: Path) -> None:
    for syntax in (uid.JPEGLossless, uid.JPEGLSLossless, uid.JPEG2000):
        codecs.transcode(uncompressed(HEAD, tmp_path), tmp_path / "x", syntax)
        ds = pydicom.dcmread(tmp_path / "x")
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        assert codecs.declared_size(frame) == (512, 512), syntax.name
        assert codecs.declared_size(frame[:3]) is None  # cut inside the header
    assert codecs.declared_size(b"\x00" * 64) is None


@pytest.mark.parametrize("syntax", [uid.JPEG2000Lossless, uid.ExplicitVRBigEndian, uid.ExplicitVRLittleEndian],
                         ids=lambda s: s.name)
def test_truncated_files_are_quarantined_with_a_clear_reason(tmp_path: Path, syntax: uid.UID) -> None:
    src = tmp_path / "src"
    src.mkdir()
    native = uncompressed(HEAD, tmp_path)
    if syntax == uid.ExplicitVRLittleEndian:  # read straight from its offset, without pydicom
        native.rename(tmp_path / "encoded")
    else:
        codecs.transcode(native, tmp_path / "encoded", syntax)
    data = (tmp_path / "encoded").read_bytes()
    (src / "cut").write_bytes(data[: len(data) * 2 // 3])
    report = ingest(src, tmp_path / "out", CFG, progress=False).report
    (row,) = locate(src, tmp_path / "out")
    assert row["file"] == "cut" and report["slices_written"] == 0
    assert row["reason"].startswith(f"pixel data cut short ({syntax.name}): the file is truncated")
    with pytest.raises(RowError, match=rf"cut short \({re.escape(syntax.name)}\): the file is truncated"):
        read_slice(data[: len(data) * 2 // 3])


@pytest.mark.parametrize(("slope", "reason"), [(0, "RescaleSlope 0 is not"), (-1, "RescaleSlope -1 is not")])
def test_rescale_slopes_that_are_not_positive_are_refused(tmp_path: Path, slope: int, reason: str) -> None:
    ds = pydicom.dcmread(real_file(HEAD))
    ds.RescaleSlope = slope
    ds.save_as(tmp_path / "s.dcm")
    with pytest.raises(UnusableFileError, match=reason):
        read_hu(tmp_path / "s.dcm", read_header(tmp_path / "s.dcm").pixels)
    with pytest.raises(RowError, match=reason):
        read_slice((tmp_path / "s.dcm").read_bytes())


def test_one_sop_lossless_and_lossy_keeps_the_lossless_copy_and_says_so(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    native = uncompressed(HEAD, tmp_path)
    codecs.transcode(native, src / "a" / "lossy", uid.JPEG2000)  # first by path: kept without the rule
    codecs.transcode(native, src / "b" / "lossless", uid.JPEGLSLossless)
    out = tmp_path / "out"
    np.testing.assert_array_equal(ingested_hu(src, out), reference_hu(HEAD))
    (row,) = locate(src, out)
    assert row["file"] == "a/lossy" and row["reason"] == (
        "duplicate of b/lossless: kept the lossless copy (JPEG-LS Lossless Image Compression) over this "
        "JPEG 2000 Image Compression one")
    assert "| … of which a lossy copy, the lossless one kept | 1 |" in (out / "ingest_report.md").read_text()
