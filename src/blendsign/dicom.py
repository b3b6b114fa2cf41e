"""DICOM reading: headers, geometry, series roles, ages and Hounsfield units (pure functions).

Nothing here writes files or keeps identifiers beyond the in-memory ``SliceHeader`` that ingestion
turns into pseudonyms.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO, Literal, overload

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import generate_frames, get_frame
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from blendsign import codecs
from blendsign.config import HeadRules
from blendsign.errors import UnusableFileError

codecs.register()  # every process that reads pixels (ingest workers, the served model) decodes the same syntaxes

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


HEADER_TAGS = [
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "Modality", "ImageType",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
    "NumberOfFrames", "ContrastBolusAgent", "PatientAge", "PatientBirthDate", "StudyDate", "SeriesNumber",
    "InstanceNumber", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "RescaleSlope", "RescaleIntercept", "SOPClassUID", "BodyPartExamined", "SeriesDescription", "ProtocolName",
    "StudyDescription", "PhotometricInterpretation",
]  # fmt: skip
# Enhanced CT: per-frame geometry, rescale and frame type live in the functional groups (PS3.3 C.7.6.16)
FUNCTIONAL_GROUP_TAGS = ["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
                         "ContrastBolusAgentSequence"]
_READ_TAGS = [Tag(t) for t in HEADER_TAGS + FUNCTIONAL_GROUP_TAGS]  # as tags: dcmread converts keywords per call
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
PIXEL_DATA_TAGS = (PIXEL_DATA_TAG, b"\x7f\xe0\x00\x10")  # little and big endian
NATIVE_LITTLE_ENDIAN: dict[str, int] = {ExplicitVRLittleEndian: 12, ImplicitVRLittleEndian: 8}  # element header bytes


@dataclass(frozen=True)
class PixelFormat:
    """How a slice's pixels are stored, and where (``offset`` of the Pixel Data element, if known)."""

    transfer_syntax_uid: str
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    samples: int
    slope: float
    intercept: float
    offset: int | None
    frames: int = 1  # NumberOfFrames of the object
    photometric: str = ""  # PhotometricInterpretation

    @property
    def direct(self) -> bool:
        """Uncompressed 16-bit grey little-endian data at a known offset: read without pydicom."""
        return (
            self.offset is not None
            and self.transfer_syntax_uid in NATIVE_LITTLE_ENDIAN
            and self.bits_allocated == 16
            and 1 <= self.bits_stored <= 16
            and self.samples == 1
        )


@dataclass(frozen=True)
class SliceHeader:
    """What ingestion needs from one file's header (identifiers are pseudonymised before any output)."""

    path: str
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_id: str
    modality: str
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row cosines, column cosines
    position: tuple[float, float, float] | None  # ImagePositionPatient (mm)
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    slice_thickness: float | None
    rows: int
    cols: int
    frames: int
    contrast: bool  # ContrastBolusAgent present and non-empty
    age_years: float | None
    series_number: int | None
    instance_number: int | None
    transfer_syntax: str
    pixels: PixelFormat
    sop_class_uid: str = ""
    body_part: str = ""  # BodyPartExamined
    descriptions: tuple[str, str, str] = ("", "", "")  # SeriesDescription, ProtocolName, StudyDescription
    frame: int | None = None  # of a multi-frame object: this slice's 0-based frame (None: a single-frame file)

    @property
    def is_localizer(self) -> bool:
        return any(t.strip().upper() == "LOCALIZER" for t in self.image_type)


def read_headers_of(path: str | Path) -> list[SliceHeader]:
    """The slices of one file: its header, or one header per frame of a multi-frame CT object (Enhanced CT,
    Legacy Converted Enhanced CT), each with the frame's own position, orientation, spacing and rescale."""
    header, ds = _read_header(path)
    if header.frames == 1:
        return [header]
    return frame_headers(ds, header)


def read_header(path: str | Path) -> SliceHeader:
    """Read one file's header (no pixel data) and where its pixel data starts.

    Raises ``UnusableFileError`` with a reason.
    """
    return _read_header(path)[0]


HEADER_PREFIX = 16384  # bytes read at once for the header pass: most CT headers end before (the rest: from the file)


def _read_header(path: str | Path) -> tuple[SliceHeader, Dataset]:
    path = str(path)
    try:
        with open(path, "rb") as fp:
            head = fp.read(HEADER_PREFIX)
            parsed = None
            if len(head) < HEADER_PREFIX:  # the whole file
                parsed = _parse_header(io.BytesIO(head), path)
            elif any(t in head for t in PIXEL_DATA_TAGS):
                # pydicom parses from memory faster than from a file (0.22 against 0.25 ms a header here); kept only
                # when it stopped at the Pixel Data tag inside the prefix, so nothing it read was cut short
                with contextlib.suppress(Exception):
                    parsed = _parse_header(io.BytesIO(head), path)
                if parsed is not None and parsed[1] is None:
                    parsed = None
            if parsed is None:
                fp.seek(0)
                parsed = _parse_header(fp, path)
    except UnusableFileError:
        raise
    except OSError as exc:
        raise UnusableFileError(f"cannot read file ({exc.strerror})") from None
    except Exception as exc:  # pydicom raises many types on truncated/corrupt input
        raise UnusableFileError(f"unreadable DICOM header ({type(exc).__name__}: {exc})") from None
    ds, offset = parsed
    return header_from_dataset(ds, path, offset), ds


def _parse_header(fp: BinaryIO, path: str) -> tuple[Dataset, int | None]:
    """The header tags of the file in ``fp`` (at its start) and the offset of its Pixel Data element, if that
    follows."""
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_READ_TAGS)
    except InvalidDicomError:
        fp.seek(0)
        ds = _read_forced(fp, path)
    return ds, fp.tell() - 4 if fp.read(4) in PIXEL_DATA_TAGS else None


def frame_headers(ds: Dataset, header: SliceHeader) -> list[SliceHeader]:
    """One header per frame of a multi-frame CT object, from its per-frame and shared functional groups (a
    per-frame item wins). A frame converted from a single-frame file keeps that file's SOPInstanceUID (Conversion
    Source Attributes), so the same series gives the same slices either way; other frames are named
    ``<SOPInstanceUID>.<frame number>``. Raises ``UnusableFileError`` without per-frame geometry."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != header.frames:
        raise UnusableFileError(f"multi-frame image ({header.frames} frames) without per-frame functional groups")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    contrast = header.contrast or any(str(i.get("ContrastBolusAgent", "")).strip()
                                      for i in ds.get("ContrastBolusAgentSequence") or [])
    out = []
    for i, group in enumerate(per_frame):

        def item(name: str, group: Dataset = group) -> Dataset:
            seq = group.get(name) or shared.get(name)
            return seq[0] if seq else Dataset()

        measures, rescale = item("PixelMeasuresSequence"), item("PixelValueTransformationSequence")
        source = item("ConversionSourceAttributesSequence").get("ReferencedSOPInstanceUID")
        frame_type = item("CTImageFrameTypeSequence").get("FrameType")
        try:
            out.append(replace(
                header,
                sop_uid=str(source) if source else f"{header.sop_uid}.{i + 1}",
                orientation=_floats(item("PlaneOrientationSequence").get("ImageOrientationPatient"), 6)
                or header.orientation,
                position=_floats(item("PlanePositionSequence").get("ImagePositionPatient"), 3),
                pixel_spacing=_floats(measures.get("PixelSpacing"), 2) or header.pixel_spacing,
                slice_thickness=_float_or_none(measures.get("SliceThickness")) or header.slice_thickness,
                image_type=tuple(str(t) for t in _as_list(frame_type)) or header.image_type,
                contrast=contrast,
                instance_number=i + 1,
                frame=i,
                pixels=replace(header.pixels, frames=header.frames,
                               slope=_rescale(rescale.get("RescaleSlope"), header.pixels.slope),
                               intercept=_rescale(rescale.get("RescaleIntercept"), header.pixels.intercept)),
            ))
        except (TypeError, ValueError) as exc:
            raise UnusableFileError(f"malformed functional groups in frame {i + 1} ({exc})") from None
    return out


def _read_forced(fp: BinaryIO, path: str) -> FileDataset:
    """Files without the 128-byte preamble are still DICOM if a forced read finds an image's UIDs."""
    if Path(path).stat().st_size == 0:
        raise UnusableFileError("empty file")
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True, specific_tags=_READ_TAGS[: len(HEADER_TAGS)])
    except Exception:
        raise UnusableFileError("not a DICOM file") from None
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
        raise UnusableFileError("not a DICOM file")
    return ds


_HEADER_VR = {name: (int(Tag(name)), dictionary_VR(name)) for name in HEADER_TAGS}
_TEXT_VRS = {"UI", "CS", "LO", "SH", "AS", "DA"}
_NUMBER_VRS = {"DS", "IS"}
_SLOW = object()  # _decode's answer for a value it leaves to pydicom


class HeaderValues:
    """``ds.get(keyword, default)`` for :data:`HEADER_TAGS`, decoding the raw bytes of the common case itself.

    Ingestion reads every file's header, and pydicom's generic value conversion costs more than parsing the
    file (about 0.9 ms of 1.5 ms per file here). Little-endian elements of these tags with plain ASCII values
    are decoded directly, exactly as pydicom would (tested against it on pydicom's real test files); anything
    else (big endian, non-ASCII text, unexpected lengths) goes through ``ds.get``.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def get(self, name: str, default: Any = None) -> Any:  # what pydicom gives: str, int, DSfloat, MultiValue, ...
        tag, vr = _HEADER_VR[name]
        raw = self.ds.get_item(tag)
        if raw is None:
            return default
        if isinstance(raw, RawDataElement) and raw.is_little_endian and raw.value is not None:
            value = _decode(raw.value, raw.VR or vr)
            if value is not _SLOW:
                return value
        return self.ds.get(name, default)


def _decode(data: bytes, vr: str) -> object:
    """An element's value as pydicom gives it (str, float, int or a list of them), or ``_SLOW``."""
    if vr == "US":
        return int.from_bytes(data, "little") if len(data) == 2 else _SLOW
    if not data.isascii() or (vr not in _TEXT_VRS and vr not in _NUMBER_VRS):
        return _SLOW
    parts = data.decode("ascii").rstrip(" \x00").split("\\")  # pydicom: trailing padding off, then split
    if vr in _TEXT_VRS:
        if vr in ("LO", "SH") and len(parts) > 1:
            return _SLOW
        return parts[0] if len(parts) == 1 else parts
    parts = [p.strip(" \x00") for p in parts]
    try:
        values = [float(p) if vr == "DS" else int(p) for p in parts if p]
    except ValueError:
        return _SLOW  # pydicom decides what a malformed number becomes
    if len(values) != len(parts):
        return _SLOW if len(parts) > 1 else ""
    return values[0] if len(values) == 1 else values


def header_from_dataset(ds: Dataset, path: str, pixel_offset: int | None = None) -> SliceHeader:
    """Extract a ``SliceHeader``; raises ``UnusableFileError`` when required tags are missing."""
    file_meta = getattr(ds, "file_meta", None)
    v = HeaderValues(ds)
    try:
        missing = [t for t in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not v.get(t)]
        if missing:
            raise UnusableFileError(f"missing required tag(s) {', '.join(missing)} (truncated or incomplete header?)")
        ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
        rows, cols = int(v.get("Rows", 0) or 0), int(v.get("Columns", 0) or 0)
        frames = int(v.get("NumberOfFrames", 1) or 1)
        return SliceHeader(
            path=path,
            study_uid=str(v.get("StudyInstanceUID")),
            series_uid=str(v.get("SeriesInstanceUID")),
            sop_uid=str(v.get("SOPInstanceUID")),
            patient_id=str(v.get("PatientID", "") or ""),
            modality=str(v.get("Modality", "") or "").upper(),
            image_type=tuple(str(t) for t in _as_list(v.get("ImageType"))),
            orientation=_floats(v.get("ImageOrientationPatient"), 6),
            position=_floats(v.get("ImagePositionPatient"), 3),
            pixel_spacing=_floats(v.get("PixelSpacing"), 2),
            slice_thickness=_float_or_none(v.get("SliceThickness")),
            rows=rows,
            cols=cols,
            frames=frames,
            contrast=bool(str(v.get("ContrastBolusAgent", "") or "").strip()),
            age_years=age_in_years(
                str(v.get("PatientAge", "") or ""),
                str(v.get("PatientBirthDate", "") or ""),
                str(v.get("StudyDate", "") or ""),
            ),
            series_number=_int_or_none(v.get("SeriesNumber")),
            instance_number=_int_or_none(v.get("InstanceNumber")),
            transfer_syntax=ts.name if ts is not None else "unknown",
            pixels=PixelFormat(
                transfer_syntax_uid=str(ts or ""),
                rows=rows,
                cols=cols,
                bits_allocated=int(v.get("BitsAllocated", 0) or 0),
                bits_stored=int(v.get("BitsStored", 0) or 0),
                pixel_representation=int(v.get("PixelRepresentation", 0) or 0),
                samples=int(v.get("SamplesPerPixel", 1) or 1),
                slope=_rescale(v.get("RescaleSlope"), 1.0),
                intercept=_rescale(v.get("RescaleIntercept"), 0.0),
                offset=pixel_offset,
                frames=frames,
                photometric=_text(v.get("PhotometricInterpretation")),
            ),
            sop_class_uid=_text(v.get("SOPClassUID")),
            body_part=_text(v.get("BodyPartExamined")),
            descriptions=(_text(v.get("SeriesDescription")), _text(v.get("ProtocolName")),
                          _text(v.get("StudyDescription"))),
        )
    except UnusableFileError:
        raise
    except Exception as exc:
        raise UnusableFileError(f"malformed header ({type(exc).__name__}: {exc})") from None


def _text(value: Any) -> str:
    return " ".join(str(v) for v in _as_list(value))


def _rescale(value: Any, default: float) -> float:
    """RescaleSlope/RescaleIntercept as a float, ``default`` when absent or empty (0 stays 0: :func:`to_hu` refuses
    a slope that is not positive)."""
    return default if value is None or value == "" else float(value)


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes | int | float):
        return [value]
    return list(value)


@overload
def _floats(value: Any, n: Literal[2]) -> tuple[float, float] | None: ...
@overload
def _floats(value: Any, n: Literal[3]) -> tuple[float, float, float] | None: ...
@overload
def _floats(value: Any, n: int) -> tuple[float, ...] | None: ...
def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    items = _as_list(value)
    if len(items) != n:
        return None
    return tuple(float(v) for v in items)


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _int_or_none(value: Any) -> int | None:
    f = _float_or_none(value)
    return None if f is None else int(f)


# --- geometry ----------------------------------------------------------------------------------------


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Unit normal of an image plane: row cosines × column cosines, shape ``[3]``."""
    row, col = np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise ValueError("degenerate ImageOrientationPatient")
    return n / norm


def is_axial(orientation: tuple[float, ...] | None, max_tilt_deg: float) -> bool:
    """True when the slice normal lies within ``max_tilt_deg`` of the patient z axis (gantry tilt)."""
    if orientation is None:
        return False
    try:
        n = slice_normal(orientation)
    except ValueError:
        return False
    return abs(float(n[2])) >= math.cos(math.radians(max_tilt_deg))


def z_position(position: tuple[float, float, float], normal: np.ndarray) -> float:
    """Position along the slice normal (mm): ``ImagePositionPatient · normal``."""
    return float(np.dot(np.asarray(position, dtype=np.float64), normal))


# Secondary Capture Image Storage and its multi-frame variants (screen saves, dose pages captured as images)
SECONDARY_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.7",)
DERIVED_IMAGE_TYPES = frozenset({"MIP", "MINIP", "MINIMUM IP", "MPR", "REFORMATTED", "CURVED", "PROJECTION IMAGE",
                                 "PERFUSION", "SCREEN SAVE", "VOLUME", "3D", "VR", "SSD", "SUBTRACTION", "DOSE"})


def is_derived(h: SliceHeader) -> bool:
    """A derived or secondary image that is not an acquired axial slice: a secondary capture (screen save), a
    MIP, reformat, projection, perfusion map, volume rendering or dose page (``ImageType`` values 3 and on)."""
    if h.sop_class_uid.startswith(SECONDARY_SOP_CLASSES):
        return True
    # not DERIVED\SECONDARY as such: scanners mark thick axial slices reconstructed from thin ones so
    return any(t.strip().upper() in DERIVED_IMAGE_TYPES for t in h.image_type[2:])


# --- head or not (paper §Data collection: head CT only) ----------------------------------------------


def _fold(text: str) -> str:
    """Upper case without accents: ``"Schädel"`` → ``"SCHADEL"``."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.upper()) if not unicodedata.combining(c))


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^A-Z0-9]+", _fold(text)) if w]


def _key(text: str) -> str:
    """A body part as compared: folded, letters and digits only (``"Head Neck"`` → ``"HEADNECK"``)."""
    return re.sub(r"[^A-Z0-9]", "", _fold(text))


@functools.lru_cache(maxsize=8)
def _folded(rules: HeadRules) -> tuple[frozenset[str], frozenset[str], tuple[str, ...], tuple[str, ...]]:
    """The rules' body parts and word beginnings, folded once per rules (not per series or served row)."""
    return (frozenset(map(_key, rules.head_body_parts)), frozenset(map(_key, rules.other_body_parts)),
            tuple(map(_fold, (*rules.head_words, *rules.extra_head_words))),
            tuple(map(_fold, (*rules.other_words, *rules.extra_other_words))))


def _says(texts: Iterable[str], head: tuple[str, ...], other: tuple[str, ...]) -> bool | None:
    """``head``/``other``: folded word beginnings."""
    words = [w for t in texts for w in _words(t)]
    if any(w.startswith(head) for w in words):
        return True
    if any(w.startswith(other) for w in words):
        return False
    return None


def head_verdict(series: Sequence[SliceHeader], rules: HeadRules) -> tuple[bool, str]:
    """Whether a CT series is a head CT, and what said so (the rules and their order: ``head_rules.toml``)."""
    h = series[0]
    head_parts, other_parts, head_words, other_words = _folded(rules)
    part = _key(h.body_part)
    if part and part in head_parts:
        return True, "BodyPartExamined"
    if part and part in other_parts:
        return False, "BodyPartExamined"
    for texts, source in ((h.descriptions[:2], "series description"), (h.descriptions[2:], "study description")):
        said = _says(texts, head_words, other_words)
        if said is not None:
            return said, source
    if h.pixel_spacing is not None and h.cols > 0:
        fov = h.cols * h.pixel_spacing[1]
        if fov > rules.max_field_of_view_mm:
            return False, "field of view"
        extent = 0.0
        positions = [s.position for s in series if s.position is not None]
        if h.orientation is not None and len(positions) == len(series):
            try:
                normal = slice_normal(h.orientation)
                zs = [z_position(p, normal) for p in positions]
                extent = max(zs) - min(zs)
            except ValueError:
                pass
        if extent > rules.max_extent_mm:
            return False, "extent"
        return True, "geometry"
    return rules.unknown == "keep", "nothing known"


# --- age ---------------------------------------------------------------------------------------------

_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_in_years(patient_age: str, birth_date: str, study_date: str) -> float | None:
    """Age at the study: from PatientAge (``nnnD/W/M/Y``), else birth and study dates, else ``None``."""
    age = patient_age.strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in _AGE_UNITS:
        return int(age[:3]) * _AGE_UNITS[age[3]]
    born, seen = _parse_date(birth_date), _parse_date(study_date)
    if born and seen and seen >= born:
        return (seen - born).days / 365.25
    return None


def _parse_date(value: str) -> date | None:
    value = value.strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


# --- pixels ------------------------------------------------------------------------------------------


def to_hu(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """HU = stored × RescaleSlope + RescaleIntercept, as int16 ``[rows, cols]``.

    Exact for the integer slope/intercept of CT; other values are rounded to the nearest HU.
    Raises ``UnusableFileError`` when the slope is not positive and finite (0 would flatten the image, a negative
    one invert it), the intercept is not finite, or the result does not fit int16.
    """
    if not (math.isfinite(slope) and slope > 0):
        raise UnusableFileError(f"RescaleSlope {slope:g} is not a positive finite number")
    if not math.isfinite(intercept):
        raise UnusableFileError(f"RescaleIntercept {intercept:g} is not a finite number")
    lo, hi = int(stored.min()), int(stored.max())
    if float(slope) == 1.0 and float(intercept).is_integer():
        b = int(intercept)
        lo, hi = lo + b, hi + b
        fits = lo >= -32768 and hi <= 32767
        if fits and (stored.dtype == np.int16 or (stored.dtype == np.uint16 and hi - b < 32768)):
            base = stored.view(np.int16)  # exact: every stored value is < 2^15
            return base + np.int16(b) if b else base.copy()
        hu = stored.astype(np.int32) + b
    else:
        hu = np.rint(stored.astype(np.float64) * slope + intercept)
        lo, hi = int(hu.min()), int(hu.max())
    if lo < -32768 or hi > 32767:
        raise UnusableFileError(f"HU range [{lo}, {hi}] does not fit int16")
    return hu.astype(np.int16)


def read_hu(source: str | Path | bytes, fmt: PixelFormat | None = None, frame: int | None = None) -> np.ndarray:
    """Decode one slice of a file (its path, or its bytes as read) and return its HU as int16 ``[rows, cols]``: a
    single-frame file, or ``frame`` of a multi-frame one (rescaled with ``fmt``'s per-frame slope and intercept).

    Uncompressed little-endian data (``fmt.direct``) is taken straight from its offset, with pydicom's unused-bit
    correction; a grey RLE Lossless slice is decoded by pydicom's decoder from its offset (:func:`_rle`); everything
    else, and an RLE slice that fails there, goes through a full read by pydicom.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if frame is not None:
        return _read_frame_hu(data, fmt, frame)
    if fmt is not None and fmt.direct:
        return to_hu(_native(data, fmt), fmt.slope, fmt.intercept)
    if fmt is not None and (stored := _rle(data, fmt)) is not None:
        return to_hu(stored, fmt.slope, fmt.intercept)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise UnusableFileError(f"unreadable DICOM ({type(exc).__name__}: {exc})") from None
    return hu_from_dataset(ds, pixel_tag_seen=fmt is not None and fmt.offset is not None)


def _read_frame_hu(data: bytes, fmt: PixelFormat | None, frame: int) -> np.ndarray:
    """HU of one frame of a multi-frame object (pydicom decodes only that frame)."""
    from pydicom.pixels import pixel_array

    if fmt is not None:
        _check_frame(data, fmt, frame)
    try:
        stored = pixel_array(io.BytesIO(data), index=frame)
    except Exception as exc:
        raise UnusableFileError(f"frame {frame + 1} cannot be decoded ({type(exc).__name__}: {exc})") from None
    if stored.ndim != 2:
        raise UnusableFileError(f"expected a 2-D grey frame, got pixel array of shape {tuple(stored.shape)}")
    return to_hu(stored, fmt.slope if fmt else 1.0, fmt.intercept if fmt else 0.0)


def _check_frame(data: bytes, fmt: PixelFormat, frame: int) -> None:
    """Refuse a compressed frame of a multi-frame object whose codestream declares another size than Rows ×
    Columns, before a decoder allocates what it asks for (the single-frame check of :func:`hu_from_dataset`)."""
    ts = UID(fmt.transfer_syntax_uid)
    if fmt.offset is None or not ts.is_encapsulated or ts == RLELossless:
        return
    try:
        f = io.BytesIO(data)
        f.seek(fmt.offset + 12)  # Pixel Data tag, VR OB, 2 reserved bytes, undefined length: then the items
        codecs.check_frame_size(get_frame(f, frame, number_of_frames=fmt.frames), fmt.rows, fmt.cols, ts.name)
    except Exception as exc:
        raise UnusableFileError(f"frame {frame + 1} cannot be decoded ({type(exc).__name__}: {exc})") from None


def missing_pixels_reason(syntax: str, pixel_tag_seen: bool) -> str:
    return f"pixel data cut short ({syntax}): the file is truncated" if pixel_tag_seen else "no pixel data"


def _native(data: bytes, fmt: PixelFormat) -> np.ndarray:
    """Stored values ``[rows, cols]`` of an uncompressed 16-bit slice, as pydicom's ``pixel_array`` gives them (a
    read-only view of ``data`` where no unused bits need correcting)."""
    assert fmt.offset is not None  # (fmt.direct)
    head_len = NATIVE_LITTLE_ENDIAN[fmt.transfer_syntax_uid]
    expected = fmt.rows * fmt.cols * 2
    head = data[fmt.offset : fmt.offset + head_len]
    length = int.from_bytes(head[-4:], "little") if len(head) == head_len else 0
    if head[:4] != PIXEL_DATA_TAG or length == 0xFFFFFFFF or length < expected:
        raise UnusableFileError(f"pixel data cannot be decoded (element of {length} bytes, need {expected})")
    start = fmt.offset + head_len
    if len(data) - start < expected:
        reason = missing_pixels_reason(UID(fmt.transfer_syntax_uid).name, True)
        raise UnusableFileError(f"{reason} ({max(len(data) - start, 0)} of {expected} bytes)")
    arr = np.frombuffer(data, dtype="<i2" if fmt.pixel_representation else "<u2", count=fmt.rows * fmt.cols,
                        offset=start).reshape(fmt.rows, fmt.cols)
    shift = 16 - fmt.bits_stored
    if shift:  # pydicom's correct_unused_bits: mask (unsigned) or sign-extend (signed) above BitsStored
        arr = np.right_shift(np.left_shift(arr, shift), shift)
    return arr


_UNDEFINED_LENGTH = b"\x00\x00\xff\xff\xff\xff"  # explicit VR OB (or OW): 2 reserved bytes, then the length


def _rle(data: bytes, fmt: PixelFormat) -> np.ndarray | None:
    """Stored values ``[rows, cols]`` of a single-frame grey RLE Lossless slice, decoded by pydicom's RLE decoder
    straight from the Pixel Data offset the header pass found, with the header's Image Pixel values: what
    ``dcmread(...).pixel_array`` gives, without parsing the whole file again (0.76 against 1.46 ms per 512×512
    slice). None when this is not such a slice or the decoder refuses it: the caller then reads it the slow way,
    which names what is wrong."""
    if fmt.offset is None or fmt.transfer_syntax_uid != RLELossless:
        return None
    head = data[fmt.offset : fmt.offset + 12]
    if (fmt.frames != 1 or fmt.samples != 1 or fmt.photometric not in ("MONOCHROME1", "MONOCHROME2")
            or head[:4] != PIXEL_DATA_TAG or head[4:6] not in (b"OB", b"OW") or head[6:] != _UNDEFINED_LENGTH):
        return None
    from pydicom.pixels import get_decoder

    f = io.BytesIO(data)
    f.seek(fmt.offset + 12)  # the first item (the Basic Offset Table)
    options: dict[str, Any] = {  # pydicom's decoding options (what it takes from the dataset otherwise)
        "rows": fmt.rows, "columns": fmt.cols, "samples_per_pixel": 1, "bits_allocated": fmt.bits_allocated,
        "bits_stored": fmt.bits_stored, "pixel_representation": fmt.pixel_representation,
        "photometric_interpretation": fmt.photometric, "number_of_frames": 1, "transfer_syntax_uid": RLELossless,
        "pixel_keyword": "PixelData"}
    try:
        stored = get_decoder(RLELossless).as_array(f, **options)[0]
    except Exception:  # truncated or corrupt: the full read reports it
        return None
    return stored if stored.shape == (fmt.rows, fmt.cols) else None


def hu_from_dataset(ds: Dataset, pixel_tag_seen: bool = False) -> np.ndarray:
    """HU of a single-frame dataset, int16 ``[rows, cols]``; compressed frames are size-checked before decoding.

    ``pixel_tag_seen``: the file holds a Pixel Data tag (pydicom drops an element cut short by truncation).
    """
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    syntax = ts.name if ts is not None else "unknown transfer syntax"
    if "PixelData" not in ds:
        raise UnusableFileError(missing_pixels_reason(syntax, pixel_tag_seen))
    if ts is not None and not UID(ts).is_encapsulated:
        need = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.get("SamplesPerPixel", 1) or 1) * (int(ds.get("BitsAllocated", 16) or 16) // 8))
        if len(ds.PixelData) < need:
            raise UnusableFileError(f"{missing_pixels_reason(syntax, True)} ({len(ds.PixelData)} of {need} bytes)")
    try:
        if ts is not None and UID(ts).is_encapsulated and ts != RLELossless:
            frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
            codecs.check_frame_size(frame, int(ds.Rows), int(ds.Columns), syntax)
        stored = ds.pixel_array
    except Exception as exc:  # missing decoder, truncated data, a frame larger than its header says, ...
        raise UnusableFileError(f"pixel data cannot be decoded ({syntax}: {type(exc).__name__}: {exc})") from None
    if stored.ndim != 2:
        raise UnusableFileError(f"expected one 2-D frame, got pixel array of shape {tuple(stored.shape)}")
    return to_hu(stored, _rescale(ds.get("RescaleSlope"), 1.0), _rescale(ds.get("RescaleIntercept"), 0.0))
