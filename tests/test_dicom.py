"""blendsign.dicom: HU conversion, geometry, ages, header reading."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue

from blendsign.config import HeadRules, load_preset
from blendsign.dicom import (
    HEADER_TAGS,
    HeaderValues,
    SliceHeader,
    UnusableFileError,
    age_in_years,
    head_verdict,
    is_axial,
    is_derived,
    read_header,
    slice_normal,
    to_hu,
    z_position,
)
from tests.conftest import real_file


def test_to_hu_unsigned_12_bit_with_intercept() -> None:
    stored = np.array([[0, 24, 1024], [1064, 2524, 4095]], dtype=np.uint16)
    np.testing.assert_array_equal(to_hu(stored, 1.0, -1024.0), [[-1024, -1000, 0], [40, 1500, 3071]])
    assert to_hu(stored, 1.0, -1024.0).dtype == np.int16


def test_to_hu_signed_and_slope() -> None:
    stored = np.array([[-1000, 0, 45]], dtype=np.int16)
    np.testing.assert_array_equal(to_hu(stored, 1, 0), stored)
    np.testing.assert_array_equal(to_hu(stored, 2, -10), [[-2010, -10, 80]])
    np.testing.assert_array_equal(to_hu(np.array([[3, 5]], np.uint16), 0.5, 0.25), [[2, 3]])  # 1.75, 2.75


def test_to_hu_refuses_int16_overflow() -> None:
    with pytest.raises(UnusableFileError, match="does not fit int16"):
        to_hu(np.array([[40000]], dtype=np.uint16), 1, 0)


@pytest.mark.parametrize(
    ("age", "birth", "study", "expected"),
    [
        ("005Y", "", "", 5.0),
        ("018M", "", "", 1.5),
        ("014D", "", "", 14 / 365.25),
        ("", "20100101", "20170101", 2557 / 365.25),
        ("", "", "20170101", None),
        ("abc", "bad", "20170101", None),
    ],
)
def test_age_in_years(age: str, birth: str, study: str, expected: float | None) -> None:
    got = age_in_years(age, birth, study)
    assert got == expected if expected is None else got is not None and math.isclose(got, expected)


@pytest.mark.parametrize(
    ("orientation", "axial"),
    [
        ((1, 0, 0, 0, 1, 0), True),
        ((1, 0, 0, 0, 0.9272, -0.3746), True),  # 22° gantry tilt (J2K_pixelrep_mismatch.dcm)
        ((1, 0, 0, 0, math.cos(math.radians(40)), -math.sin(math.radians(40))), False),
        ((1, 0, 0, 0, 0, -1), False),  # coronal
        ((0, 1, 0, 0, 0, -1), False),  # sagittal
        (None, False),
        ((1, 0, 0, 1, 0, 0), False),  # degenerate
    ],
)
def test_is_axial(orientation: tuple[float, ...] | None, axial: bool) -> None:
    assert is_axial(orientation, 30.0) is axial


def test_z_position_projects_on_normal() -> None:
    n = slice_normal((1, 0, 0, 0, 1, 0))
    np.testing.assert_allclose(n, [0, 0, 1])
    assert z_position((-100.0, 20.0, 37.5), n) == 37.5
    tilted = slice_normal((1, 0, 0, 0, 0.8, -0.6))  # normal (0, 0.6, 0.8)
    assert math.isclose(z_position((0.0, 10.0, 10.0), tilted), 14.0)


def test_read_header_of_real_ct() -> None:
    h = read_header(real_file("CT_small.dcm"))
    assert (h.modality, h.rows, h.cols, h.frames) == ("CT", 128, 128, 1)
    assert h.contrast  # CT_small.dcm carries ContrastBolusAgent ISOVUE300/100
    assert h.age_years == 0.0
    assert h.pixel_spacing == (0.661468, 0.661468)
    assert not h.is_localizer


def test_read_header_reasons(tmp_path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text.dcm").write_text("not dicom at all\n")
    with pytest.raises(UnusableFileError, match="empty file"):
        read_header(tmp_path / "empty")
    with pytest.raises(UnusableFileError, match="not a DICOM file"):
        read_header(tmp_path / "text.dcm")


@pytest.mark.parametrize("filler", [b"\x00", b"\xe0\x7f\x10\x00"])  # the second: Pixel Data tags inside the prefix
def test_a_header_longer_than_the_prefix_is_read_from_the_file(tmp_path: Path, filler: bytes) -> None:
    from blendsign.dicom import HEADER_PREFIX, read_hu
    from tests.conftest import write_ct

    hu = np.arange(48, dtype=np.int16).reshape(8, 6)
    path = tmp_path / "x.dcm"
    write_ct(path, hu, study="1.2", series="1.2.1")
    ds = pydicom.dcmread(path)
    ds.add_new(0x00091010, "OB", filler * (2 * HEADER_PREFIX // len(filler)))  # a private block before the pixels
    ds.save_as(path, enforce_file_format=True)
    h = read_header(path)
    assert h.pixels.offset is not None and h.pixels.offset > HEADER_PREFIX and h.sop_uid == ds.SOPInstanceUID
    np.testing.assert_array_equal(read_hu(path, h.pixels), hu)
    assert read_header(path) == h


# --- the direct read of uncompressed pixels must equal pydicom's decode ------------------------------


def _pydicom_hu(path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_rescale

    ds = pydicom.dcmread(path)
    return apply_rescale(ds.pixel_array, ds)


@pytest.mark.parametrize(("name", "direct"), [("CT_small.dcm", True), ("693_UNCI.dcm", True),
                                              ("693_UNCR.dcm", True), ("J2K_pixelrep_mismatch.dcm", False),
                                              ("693_J2KI.dcm", False)])
def test_read_hu_matches_pydicom_on_real_files(name: str, direct: bool) -> None:
    from blendsign.dicom import read_hu

    path = real_file(name)
    fmt = read_header(path).pixels
    assert fmt.direct is direct
    np.testing.assert_array_equal(read_hu(path, fmt), _pydicom_hu(path))


@pytest.mark.parametrize(("pixel_representation", "bits_stored", "intercept"), [(0, 12, -1024), (1, 12, 0), (1, 16, 0)])
def test_read_hu_handles_unused_high_bits_like_pydicom(tmp_path, pixel_representation, bits_stored, intercept) -> None:
    """Garbage above BitsStored: pydicom masks (unsigned) or sign-extends (signed); so must we."""
    from blendsign.dicom import read_hu
    from tests.conftest import write_ct

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 65536, size=(8, 6)).astype(np.uint16)  # every bit pattern, high bits included
    path = tmp_path / "x.dcm"
    write_ct(path, np.zeros((8, 6), np.int16), study="1.2", series="1.2.1", BitsStored=bits_stored,
             HighBit=bits_stored - 1, PixelRepresentation=pixel_representation, RescaleIntercept=intercept,
             PixelData=raw.tobytes())
    fmt = read_header(path).pixels
    assert fmt.direct
    np.testing.assert_array_equal(read_hu(path, fmt), _pydicom_hu(path))


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # the slice cut short
@pytest.mark.parametrize(("pixel_representation", "bits_stored", "intercept"), [(0, 12, -1024), (1, 12, 0), (1, 16, 0)])
def test_an_rle_slice_is_decoded_from_its_offset_like_pydicom(tmp_path, monkeypatch, pixel_representation,
                                                              bits_stored, intercept) -> None:
    """A grey RLE Lossless slice is decoded from the Pixel Data offset the header pass found, without a second
    parse of the file, to what pydicom's full read gives (unused high bits included)."""
    from pydicom.uid import RLELossless

    from blendsign import dicom
    from tests.conftest import write_ct

    rng = np.random.default_rng(2)
    raw = rng.integers(0, 65536, size=(16, 12)).astype(np.uint16)
    path = tmp_path / "x.dcm"
    write_ct(path, np.zeros((16, 12), np.int16), study="1.2", series="1.2.1", BitsStored=bits_stored,
             HighBit=bits_stored - 1, PixelRepresentation=pixel_representation, RescaleIntercept=intercept,
             PixelData=raw.tobytes())
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    expected = _pydicom_hu(path)
    fmt = read_header(path).pixels
    assert not fmt.direct and fmt.photometric == "MONOCHROME2" and fmt.offset is not None

    def no_full_read(*args: object, **kwargs: object) -> object:
        raise AssertionError("the whole file was parsed again")

    monkeypatch.setattr(dicom.pydicom, "dcmread", no_full_read)
    np.testing.assert_array_equal(dicom.read_hu(path, fmt), expected)
    monkeypatch.undo()
    data = path.read_bytes()
    with pytest.raises(UnusableFileError, match=r"cut short \(RLE Lossless\)"):  # the full read says why
        dicom.read_hu(data[: (fmt.offset + len(data)) // 2], fmt)


def test_real_rle_files_decode_like_pydicom_and_others_take_the_full_read() -> None:
    from blendsign.dicom import _rle, read_hu

    fast = real_file("MR_small_RLE.dcm")  # 16-bit signed grey, one frame
    fmt = read_header(fast).pixels
    assert _rle(fast.read_bytes(), fmt) is not None
    np.testing.assert_array_equal(read_hu(fast, fmt), _pydicom_hu(fast))
    for name in ("SC_rgb_rle.dcm", "emri_small_RLE.dcm"):  # colour; ten frames
        path = real_file(name)
        assert _rle(path.read_bytes(), read_header(path).pixels) is None


def _pydicom_value(ds: pydicom.Dataset, name: str) -> object:
    value = ds.get(name)
    if isinstance(value, MultiValue):
        return [_plain(v) for v in value]
    return _plain(value)


def _plain(value: object) -> object:
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value) if isinstance(value, float) else int(value)
    return value if value is None else str(value)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_header_values_equal_pydicom_on_every_real_file() -> None:
    """The fast header decoding gives what pydicom gives, for every header tag of every bundled test file
    that pydicom can parse (all transfer syntaxes, implicit and big endian ones included)."""
    import data_store  # pydicom-data's files (pydicom's get_testdata_files("*") would try downloads)
    import pydicom.data

    folders = [Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"]
    compared = fast = 0
    for path in sorted(p for folder in folders for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            reference = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            expected = {name: _pydicom_value(reference, name) for name in HEADER_TAGS}
        except Exception:  # not DICOM, or files pydicom itself rejects
            continue
        values = HeaderValues(ds)
        for name in HEADER_TAGS:
            got = values.get(name)
            got = [_plain(v) for v in got] if isinstance(got, list | MultiValue) else _plain(got)
            assert got == expected[name], (path, name)
            compared += 1
        fast += sum(isinstance(ds.get_item(t), RawDataElement) for t in ds.keys())  # noqa: SIM118 (iterating converts)
    assert compared > 1000 and fast > 100  # many files, most values decoded without pydicom


# --- head or not ----------------------------------------------------------------------------------------------


def _header(body_part: str = "", descriptions: tuple[str, str, str] = ("", "", ""), cols: int = 512,
            spacing: float | None = 0.45, z: float = 0.0, image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY"),
            sop_class: str = "1.2.840.10008.5.1.4.1.1.2") -> SliceHeader:
    h = read_header(real_file("693_UNCI.dcm"))
    return replace(h, body_part=body_part, descriptions=descriptions, cols=cols, image_type=image_type,
                   pixel_spacing=None if spacing is None else (spacing, spacing), position=(0.0, 0.0, z),
                   sop_class_uid=sop_class)


@pytest.mark.parametrize(("header", "verdict"), [
    (_header("HEAD"), (True, "BodyPartExamined")),
    (_header("Abdomen", ("HEAD 5mm", "", "")), (False, "BodyPartExamined")),  # the tag speaks first
    (_header("PANCREAS"), (False, "BodyPartExamined")),
    (_header("", ("", "", "CT ABDOMEN PELVIS")), (False, "study description")),
    (_header("", ("Schädel nativ", "", "CT ABDOMEN")), (True, "series description")),  # series before study
    (_header("", ("", "CRANE SANS INJECTION", "")), (True, "series description")),  # French, protocol name
    (_header("", ("5/5mm Plain", "", "")), (True, "geometry")),  # 512 × 0.45 = 230 mm
    (_header("NECK", ("", "", ""), spacing=0.8), (False, "field of view")),  # 410 mm: no head
    (_header("", spacing=None), (True, "nothing known")),
])  # fmt: skip
def test_head_verdicts_follow_the_rules_in_their_order(header: SliceHeader, verdict: tuple[bool, str]) -> None:
    assert head_verdict([header], HeadRules()) == verdict


def test_a_series_longer_than_a_head_is_not_one_and_site_rules_change_the_verdicts() -> None:
    series = [_header(z=z) for z in (0.0, 200.0, 400.0)]
    assert head_verdict(series, HeadRules()) == (False, "extent")
    orbit = _header("", ("ORBITA 2mm", "", ""))
    assert head_verdict([orbit], HeadRules()) == (True, "geometry")
    assert head_verdict([orbit], HeadRules(extra_other_words=("ORBITA",))) == (False, "series description")
    assert head_verdict([_header(spacing=None)], HeadRules(unknown="set_aside")) == (False, "nothing known")


def test_the_packaged_rules_file_documents_every_rule() -> None:
    import tomllib
    from dataclasses import fields
    from importlib.resources import files

    data = tomllib.loads(files("blendsign").joinpath("head_rules.toml").read_text())
    assert set(data) == {f.name for f in fields(HeadRules)}


@pytest.mark.parametrize(("table", "error"), [
    ('head_wrds = ["X"]', r"unknown config field\(s\) for HeadRules: \['head_wrds'\]"),
    ('head_words = "HEAD"', "ingest.head.head_words must be a list of non-empty strings"),
    ("max_extent_mm = -1", "ingest.head.max_extent_mm must be a positive number"),
    ('unknown = "drop"', 'ingest.head.unknown must be "keep" or "set_aside"'),
])  # fmt: skip
def test_a_site_rules_table_is_checked_at_load_with_the_file_named(tmp_path: Path, table: str, error: str) -> None:
    site = tmp_path / "site.toml"
    site.write_text(f"[ingest.head]\n{table}\n")
    with pytest.raises(ValueError, match=f"{site}: .*{error}"):
        load_preset(str(site))


def test_a_site_file_adds_words_and_keeps_every_other_default(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[ingest.head]\nextra_head_words = ["NNH"]\nmax_field_of_view_mm = 280\n')
    rules = load_preset(str(site)).ingest.head
    assert rules == replace(HeadRules(), extra_head_words=("NNH",), max_field_of_view_mm=280.0)


@pytest.mark.parametrize(("image_type", "sop_class", "derived"), [
    (("ORIGINAL", "PRIMARY", "AXIAL"), "1.2.840.10008.5.1.4.1.1.2", False),
    (("DERIVED", "SECONDARY", "AXIAL"), "1.2.840.10008.5.1.4.1.1.2", False),  # thick slices from thin ones
    (("DERIVED", "SECONDARY", "MIP"), "1.2.840.10008.5.1.4.1.1.2", True),
    (("DERIVED", "PRIMARY", "PERFUSION", "RCBF"), "1.2.840.10008.5.1.4.1.1.2.1", True),  # eCT_Supplemental.dcm
    (("ORIGINAL", "PRIMARY"), "1.2.840.10008.5.1.4.1.1.7", True),  # a screen save
])  # fmt: skip
def test_derived_and_secondary_images(image_type: tuple[str, ...], sop_class: str, derived: bool) -> None:
    assert is_derived(_header(image_type=image_type, sop_class=sop_class)) is derived
