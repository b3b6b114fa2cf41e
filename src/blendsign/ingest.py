"""DICOM → de-identified Parquet slice dataset, with the paper's exclusions and a flow report.

Paper §Data collection and labeling / Figure 2: studies found → excluded (postoperative, no
non-contrast axial series, age < 7) → scans used. One scan per study: its non-contrast axial CT series.

Output (``OUT``):
    slices/<scan_id>.parquet   one file per scan, one row (and row group) per slice, z order; ``hu`` compressed
    manifest.json              per-scan file, slice count and source digest; the dataset fingerprint
    ingest_report.json         counts, exclusions, quarantined files with reasons (no identifiers)
    ingest_report.md           the same as a flow chart for people
    _SUCCESS                   written last; removed before a re-run changes anything (later stages require it)

Files are named in reports and logs by keyed pseudonyms (``file-<hash>`` of the path under SOURCE): export
file and folder names are often UIDs or patient names. ``locate`` maps them back for whoever holds SOURCE.

Two passes: headers of every file (no pixels) to group, select and exclude; then per scan, read each of its files
once, digest its bytes (XXH3-128), decode, convert to HU, order along the slice normal and write. Re-running skips
scans whose Parquet file was written from the same source files (same digests of their bytes: a copy, a re-upload
or a fresh S3 mirror of the same data reuses everything and keeps the dataset fingerprint) and rewrites the rest,
so a killed run completes. An output whose files were digested with another algorithm (BLAKE2b before issue 16.3,
SHA-256 on 2026-12-03) is rewritten once, with a new dataset fingerprint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from blendsign import storage
from blendsign.codecs import LOSSY_SYNTAXES
from blendsign.config import IngestConfig
from blendsign.deid import Pseudonymizer, load_or_create_key
from blendsign.dicom import (
    PixelFormat,
    SliceHeader,
    head_verdict,
    is_axial,
    is_derived,
    read_headers_of,
    read_hu,
    slice_normal,
    z_position,
)
from blendsign.errors import ConfigError, InputError, UnusableFileError
from blendsign.progress import progress as progress_bar
from blendsign.storage import atomic_path, remove_stale_temporaries, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# Of each source file's bytes, for change detection only (not security): XXH3-128 (0.01 against SHA-256's 0.27 ms per
# 512 KiB file here). Named in every scan's source digest, so an output digested otherwise is rewritten once. Before:
# SHA-256 (2026-12-03, issue 16.3), BLAKE2b (16 bytes).
CONTENT_DIGEST = "xxh3_128"
FORMAT_VERSION = "2"  # 2 (2026-12-03): hu as two byte planes (encode_hu); 1: plain little-endian int16
SLICE_SCHEMA = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),  # pseudonym of StudyInstanceUID
        pa.field("patient_key", pa.string(), nullable=False),  # pseudonym of PatientID (patient-level folds)
        pa.field("slice_index", pa.int32(), nullable=False),  # 0-based, z order
        pa.field("z_mm", pa.float64(), nullable=False),  # ImagePositionPatient · slice normal
        pa.field("rows", pa.int32(), nullable=False),
        pa.field("cols", pa.int32(), nullable=False),
        pa.field("pixel_spacing_mm", pa.list_(pa.float64())),  # [row spacing, column spacing]
        pa.field("slice_thickness_mm", pa.float64()),
        pa.field("instance_key", pa.string(), nullable=False),  # pseudonym of SOPInstanceUID
        pa.field("transfer_syntax", pa.string(), nullable=False),  # of the source file
        pa.field("hu", pa.binary(), nullable=False),  # int16 rows × cols as two byte planes: encode_hu / decode_hu
    ],
    metadata={"blendsign.format": FORMAT_VERSION,
              "blendsign.hu": "int16 rows x cols, row-major: the low bytes of every pixel, then the high bytes"},
)

def encode_hu(hu: np.ndarray) -> bytes:
    """The stored ``hu`` value of a ``[rows, cols]`` int16 slice: the low byte of every pixel (row-major), then
    every high byte. The high plane is nearly constant, so zstd-1 compresses the planes 2.6× in half the time
    it takes to compress the interleaved int16 1.9× (benchmarks/README.md, "Slice encoding"); zstd -1, the
    default since issue 16.3, 1.9× in half the time again."""
    out = np.empty(2 * hu.size, np.uint8)
    _encode_hu_into(hu, out)
    return out.tobytes()


def _encode_hu_into(hu: np.ndarray, out: np.ndarray) -> None:
    """:func:`encode_hu` into ``out`` (uint8, ``2 * hu.size``): byte casts, not strided byte copies (5× faster)."""
    v = np.asarray(hu, dtype=np.int16).view(np.uint16).ravel()
    n = v.size
    np.copyto(out[:n], v, casting="unsafe")  # uint16 → uint8 keeps the low byte
    np.right_shift(v, 8, out=out[n:], casting="unsafe")


def decode_hu(value: bytes | memoryview | pa.Buffer, rows: int, cols: int) -> np.ndarray:
    """``[rows, cols]`` int16 HU from a stored ``hu`` value (:func:`encode_hu`)."""
    planes, n = np.frombuffer(value, dtype=np.uint8), rows * cols
    if planes.size != 2 * n:
        raise InputError(f"a stored slice of {planes.size} bytes cannot be {rows}×{cols} int16 pixels")
    return ((planes[n:].view(np.int8).astype(np.int16) << 8) | planes[:n]).reshape(rows, cols)


def check_format(out: str | Path) -> None:
    """Refuse an ingest output written in another dataset format, with what to do about it."""
    found = str(read_manifest(out).get("format"))
    if found != FORMAT_VERSION:
        raise InputError(f"{out} holds dataset format {found}; this blendsign reads format {FORMAT_VERSION} (its "
                         "slices are stored as byte planes since 2026-12-03): ingest the DICOM again, into this "
                         "folder or a new one")


# --- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceSource:
    path: str
    instance_key: str
    z_mm: float
    instance_number: int
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    transfer_syntax: str
    pixels: PixelFormat
    frame: int | None  # of a multi-frame object


@dataclass(frozen=True)
class ScanTask:
    """One scan to write: everything a worker needs, identifiers already pseudonymised."""

    scan_id: str
    patient_key: str
    slices: tuple[SliceSource, ...]
    settings: str  # what the source digest covers besides the files' bytes: format, key, write settings, patient
    out_path: str
    compression: str
    compression_level: int
    rows_per_row_group: int


@dataclass(frozen=True)
class ScanOutcome:
    scan_id: str
    slices: int
    digest: str  # the scan's source digest: same source files, key and settings ⇒ same Parquet file
    reused: bool
    quarantined: tuple[tuple[str, str], ...]  # (absolute path, reason)


@dataclass(frozen=True)
class IngestResult:
    out: Path
    report: dict[str, Any]

    def summary(self) -> str:
        r = self.report
        lines = [
            f"ingested {r['slices_written']} slices of {r['scans_written']} scans into {self.out / 'slices'}",
            f"  studies found {r['studies_found']}; excluded "
            + (", ".join(f"{k} {v}" for k, v in r["excluded"].items() if v) or "none"),
            f"  files found {r['files_found']}; quarantined {len(r['quarantined'])}; "
            f"duplicates {len(r['duplicates'])}; scans reused from a previous run {r['scans_reused']}"
            + (f"; removed {r['stale_scans_removed']} scans this source no longer yields"
               if r.get("stale_scans_removed") else ""),
            f"  report: {self.out / REPORT} (flow chart: {REPORT_MD})",
        ]
        return "\n".join(lines)


# --- pass 1: headers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFiles:
    """What a walk of the source found: regular files to read, and ``(path, reason)`` for what cannot be read."""

    files: list[Path]
    unusable: list[tuple[str, str]]  # non-regular files (never opened: a named pipe would block) and folders


_NOT_REGULAR = {stat.S_IFIFO: "named pipe", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
                stat.S_IFBLK: "block device"}  # fmt: skip


def find_files(source: Path, skip: Iterable[Path] = ()) -> SourceFiles:
    """Every regular file under ``source`` (any name, with or without ``.dcm``), sorted; ``skip`` excluded.

    Named pipes, sockets and devices are listed as unusable without being opened; so is a folder that cannot be
    listed (its files would otherwise vanish without a word).
    """
    if not source.is_dir():
        raise NotADirectoryError(f"DICOM source {source} is not a folder")
    skip_set = {p.resolve() for p in skip}
    files: list[Path] = []
    unusable: list[tuple[str, str]] = []

    def unreadable(exc: OSError) -> None:
        unusable.append((str(exc.filename), f"folder cannot be read ({exc.strerror}): its files were not ingested"))

    for root, dirs, names in os.walk(source, onerror=unreadable):
        root_path, resolved = Path(root), Path(root).resolve()  # a name under it that is no link: resolved / name
        dirs[:] = sorted(d for d in dirs if resolved / d not in skip_set)  # (os.walk follows no linked folder)
        for name in sorted(names):
            path = root_path / name
            try:
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    if path.resolve() in skip_set:
                        continue
                    mode = path.stat().st_mode
                elif resolved / name in skip_set:
                    continue
            except OSError as exc:
                unusable.append((str(path), f"cannot read file ({exc.strerror})"))
                continue
            if stat.S_ISREG(mode):
                files.append(path)
            else:
                kind = _NOT_REGULAR.get(stat.S_IFMT(mode), "special file")
                unusable.append((str(path), f"not a regular file ({kind}): not read"))
    return SourceFiles(files, unusable)


def read_headers(paths: Sequence[str]) -> tuple[list[SliceHeader], list[tuple[str, str]]]:
    """Headers of ``paths`` and ``(path, reason)`` for files that are not usable DICOM."""
    headers: list[SliceHeader] = []
    bad: list[tuple[str, str]] = []
    for p in paths:
        try:
            headers.extend(read_headers_of(p))
        except UnusableFileError as exc:
            bad.append((p, str(exc)))
        except OSError as exc:
            bad.append((p, f"cannot read file ({exc.strerror})"))
    return headers, bad


# --- selection and exclusions ------------------------------------------------------------------------


@dataclass
class Plan:
    """Pass-1 decisions: scans to write and everything not used, with reasons."""

    tasks: list[ScanTask] = field(default_factory=list)
    studies_found: int = 0
    excluded: dict[str, list[str]] = field(default_factory=dict)  # reason -> scan ids
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)  # (file, file kept, why that one)
    series_skipped: Counter[str] = field(default_factory=Counter)
    images_skipped: Counter[str] = field(default_factory=Counter)
    age_unknown: int = 0
    patient_id_missing: int = 0


def age_reason(cfg: IngestConfig) -> str:
    return f"age_lt_{cfg.min_age_years:g}"


def series_role(series: list[SliceHeader], cfg: IngestConfig) -> str:
    """Why a CT series is not a candidate scan (``localizer``, ``derived``, ``contrast``, ``non_axial``,
    ``not_head``) or ``axial``."""
    images = [h for h in series if not h.is_localizer]
    if not images:
        return "localizer"
    if is_derived(images[0]):
        return "derived"
    if cfg.require_non_contrast and any(h.contrast for h in images):
        return "contrast"
    if not is_axial(images[0].orientation, cfg.max_axial_tilt_deg):
        return "non_axial"
    if cfg.head.required and not head_verdict(images, cfg.head)[0]:
        return "not_head"
    return "axial"


def _usable_images(series: list[SliceHeader], plan: Plan) -> list[SliceHeader]:
    """Images of an axial series that can be stacked: consistent geometry, one frame, not a localizer."""
    images = []
    for h in series:
        if h.is_localizer:
            plan.images_skipped["localizer_in_axial_series"] += 1
        elif h.frames != 1 and h.frame is None:
            plan.quarantined.append((h.path, f"multi-frame image ({h.frames} frames) is not supported"))
        elif h.position is None or h.orientation is None:
            plan.quarantined.append((h.path, "no ImagePositionPatient/ImageOrientationPatient"))
        elif h.rows <= 0 or h.cols <= 0:
            plan.quarantined.append((h.path, "no Rows/Columns"))
        else:
            images.append(h)
    if not images:
        return images
    shape = Counter((h.rows, h.cols) for h in images).most_common(1)[0][0]
    ref = np.asarray(images[0].orientation)
    kept = []
    for h in images:
        if (h.rows, h.cols) != shape:
            plan.quarantined.append((h.path, f"size {h.rows}x{h.cols} differs from its series ({shape[0]}x{shape[1]})"))
        elif not np.allclose(h.orientation, ref, atol=1e-3):  # type: ignore[arg-type]  # not None: _usable_images
            plan.quarantined.append((h.path, "orientation differs from the rest of its series"))
        else:
            kept.append(h)
    return kept


def plan_ingest(
    headers: list[SliceHeader],
    postoperative: set[str],
    cfg: IngestConfig,
    pseudo: Pseudonymizer,
    slices_dir: Path,
) -> Plan:
    """Group headers by study/series, pick each study's scan, apply exclusions (paper Figure 2)."""
    plan = Plan()
    unique: list[SliceHeader] = []
    seen: dict[str, SliceHeader] = {}
    # one file per SOPInstanceUID: a lossless copy before a lossy one (archives keep both), then by path
    for h in sorted(headers, key=lambda h: (h.pixels.transfer_syntax_uid in LOSSY_SYNTAXES, h.path)):
        if h.sop_uid in seen:
            kept = seen[h.sop_uid]
            lossy = h.pixels.transfer_syntax_uid in LOSSY_SYNTAXES
            why = (f"kept the lossless copy ({kept.transfer_syntax}) over this {h.transfer_syntax} one"
                   if lossy and kept.pixels.transfer_syntax_uid not in LOSSY_SYNTAXES else "same file again")
            plan.duplicates.append((h.path, kept.path, why))
            continue
        seen[h.sop_uid] = h
        if h.modality != "CT":
            plan.quarantined.append((h.path, f"modality {h.modality or 'missing'} is not CT"))
            continue
        unique.append(h)

    studies: dict[str, dict[str, list[SliceHeader]]] = defaultdict(lambda: defaultdict(list))
    for h in unique:
        studies[h.study_uid][h.series_uid].append(h)
    plan.studies_found = len(studies)
    plan.excluded = {r: [] for r in ("postoperative", "not_head_ct", "no_noncontrast_axial_series", age_reason(cfg))}

    for study_uid in sorted(studies):
        series_map = studies[study_uid]
        scan_id = pseudo.scan(study_uid)
        candidates: list[list[SliceHeader]] = []
        roles = set()
        for series_uid in sorted(series_map):
            series = series_map[series_uid]
            role = series_role(series, cfg)
            roles.add(role)
            if role != "axial":
                plan.series_skipped[role] += 1
                continue
            images = _usable_images(series, plan)
            if images:
                candidates.append(images)
        # the scan: most slices, then lowest SeriesNumber
        candidates.sort(key=lambda s: (-len(s), s[0].series_number or 0, s[0].series_uid))
        if len(candidates) > 1:
            plan.series_skipped["extra_axial_series"] += len(candidates) - 1

        all_headers = [h for s in series_map.values() for h in s]
        age = next((h.age_years for h in all_headers if h.age_years is not None), None)
        if study_uid in postoperative:
            reason = "postoperative"
        elif not candidates and "not_head" in roles:
            reason = "not_head_ct"
        elif not candidates:
            reason = "no_noncontrast_axial_series"
        elif age is not None and age < cfg.min_age_years:
            reason = age_reason(cfg)
        else:
            reason = None
        if reason:
            plan.excluded[reason].append(scan_id)
            continue
        if age is None:
            plan.age_unknown += 1
        chosen = candidates[0]
        patient_id = chosen[0].patient_id
        if not patient_id:
            plan.patient_id_missing += 1
        patient_key = pseudo.patient(patient_id) if patient_id else pseudo.patient(f"study:{study_uid}")
        plan.tasks.append(_scan_task(scan_id, patient_key, chosen, cfg, pseudo, slices_dir))
    return plan


def _scan_task(
    scan_id: str,
    patient_key: str,
    images: list[SliceHeader],
    cfg: IngestConfig,
    pseudo: Pseudonymizer,
    slices_dir: Path,
) -> ScanTask:
    normal = slice_normal(images[0].orientation)  # type: ignore[arg-type]  # not None: _usable_images
    slices = sorted(
        (
            SliceSource(
                path=h.path,
                instance_key=pseudo.instance(h.sop_uid),
                z_mm=z_position(h.position, normal),  # type: ignore[arg-type]  # not None: _usable_images
                instance_number=h.instance_number or 0,
                rows=h.rows,
                cols=h.cols,
                pixel_spacing=h.pixel_spacing,
                slice_thickness=h.slice_thickness,
                transfer_syntax=h.transfer_syntax,
                pixels=h.pixels,
                frame=h.frame,
            )
            for h in images
        ),
        key=lambda s: (s.z_mm, s.instance_number, s.instance_key),
    )
    settings = (f"{FORMAT_VERSION}|{CONTENT_DIGEST}|{pseudo.fingerprint}|{cfg.compression}|{cfg.compression_level}|"
                f"{cfg.rows_per_row_group}|{patient_key}")
    return ScanTask(
        scan_id=scan_id,
        patient_key=patient_key,
        slices=tuple(slices),
        settings=settings,
        out_path=str(slices_dir / f"{scan_id}.parquet"),
        compression=cfg.compression,
        compression_level=cfg.compression_level,
        rows_per_row_group=cfg.rows_per_row_group,
    )


def read_clinical(path: Path) -> set[str]:
    """StudyInstanceUIDs marked postoperative in ``study_instance_uid,postoperative`` CSV."""
    truthy, falsy = {"1", "true", "yes", "y", "t"}, {"0", "false", "no", "n", "f", ""}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"study_instance_uid", "postoperative"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{path.name}: missing column(s) {sorted(missing)}")
        said: dict[str, tuple[bool, int]] = {}
        for line, row in enumerate(reader, start=2):
            value, uid = (row["postoperative"] or "").strip().lower(), (row["study_instance_uid"] or "").strip()
            if value not in truthy | falsy:
                raise InputError(f"{path.name} line {line}: postoperative must be true/false, got {value!r}")
            if uid in said and said[uid][0] != (value in truthy):
                raise InputError(f"{path.name} lines {said[uid][1]} and {line} say different things of one study")
            said[uid] = (value in truthy, line)
    return {uid for uid, (postop, _) in said.items() if postop}


# --- pass 2: pixels ----------------------------------------------------------------------------------


def _existing_digest(path: str) -> str | None:
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # missing or unreadable: rewrite
        return None
    return meta.get(b"blendsign.source_digest", b"").decode() or None


def _source_digest(task: ScanTask, contents: Sequence[str]) -> str:
    """The scan's source digest: its settings and, in z order, each slice's instance key and file digest (file
    names, folders and mtimes do not change what is written)."""
    digest = hashlib.sha256(task.settings.encode())
    for s, content in zip(task.slices, contents, strict=True):
        digest.update(f"|{s.instance_key}:{content}".encode())
    return digest.hexdigest()


def _file_digest(data: bytes) -> str:
    """A source file's digest with :data:`CONTENT_DIGEST` (``xxh3_128``, or a hashlib name)."""
    if CONTENT_DIGEST == "xxh3_128":
        return xxhash.xxh3_128_hexdigest(data)
    return hashlib.new(CONTENT_DIGEST, data).hexdigest()


def _contents(task: ScanTask) -> list[str]:
    """Each slice's file digest, reading each file once (frames of a multi-frame file share it)."""
    digests: dict[str, str] = {}
    for s in task.slices:
        if s.path not in digests:
            try:
                digests[s.path] = _file_digest(Path(s.path).read_bytes())
            except OSError:
                digests[s.path] = "unreadable"
    return [digests[s.path] for s in task.slices]


def write_scan(task: ScanTask) -> ScanOutcome:
    """Read, digest and decode a scan's slices to HU and write its Parquet file atomically, each file read once;
    a Parquet file written from the same source digest is kept (then its files are read and digested, not
    decoded)."""
    previous = _existing_digest(task.out_path)
    if previous is not None and previous == _source_digest(task, _contents(task)):
        n = pq.read_metadata(task.out_path).num_rows
        return ScanOutcome(task.scan_id, n, previous, True, ())
    quarantined: list[tuple[str, str]] = []
    contents: list[str] = []
    kept: list[SliceSource] = []
    planes: np.ndarray | None = None  # row i: the stored hu value of kept[i] (encode_hu)
    path, data, digest = "", b"", ""
    for s in task.slices:
        try:
            if s.path != path:  # the frames of a multi-frame file come from one read
                data = Path(s.path).read_bytes()
                path, digest = s.path, _file_digest(data)
            contents.append(digest)
            hu = read_hu(data, s.pixels, s.frame)
            if hu.shape != (s.rows, s.cols):
                raise UnusableFileError(f"pixel array {hu.shape} does not match Rows/Columns {(s.rows, s.cols)}")
        except UnusableFileError as exc:
            quarantined.append((s.path, str(exc)))
            continue
        except OSError as exc:
            contents.append("unreadable")
            quarantined.append((s.path, f"cannot read file ({exc.strerror})"))
            continue
        if planes is None:  # sized by a decoded slice, not by what a header claims
            planes = np.empty((len(task.slices), 2 * hu.size), np.uint8)
        _encode_hu_into(hu, planes[len(kept)])
        kept.append(s)
    source_digest = _source_digest(task, contents)
    if planes is None:
        Path(task.out_path).unlink(missing_ok=True)
        return ScanOutcome(task.scan_id, 0, source_digest, False, tuple(quarantined))
    n = len(kept)
    # A scan that lost slices is not marked up to date: the next run redoes it, so its quarantined files are
    # reported again and a file that failed to read (a transient I/O error, a file fixed in place) gets another try.
    stored = source_digest + ("+incomplete" if quarantined else "")
    table = pa.table(
        {
            "scan_id": pa.array([task.scan_id] * n, pa.string()),
            "patient_key": pa.array([task.patient_key] * n, pa.string()),
            "slice_index": pa.array(range(n), pa.int32()),
            "z_mm": pa.array([s.z_mm for s in kept], pa.float64()),
            "rows": pa.array([s.rows for s in kept], pa.int32()),
            "cols": pa.array([s.cols for s in kept], pa.int32()),
            "pixel_spacing_mm": pa.array([list(s.pixel_spacing) if s.pixel_spacing else None for s in kept],
                                         pa.list_(pa.float64())),
            "slice_thickness_mm": pa.array([s.slice_thickness for s in kept], pa.float64()),
            "instance_key": pa.array([s.instance_key for s in kept], pa.string()),
            "transfer_syntax": pa.array([s.transfer_syntax for s in kept], pa.string()),
            "hu": _binary_rows(planes[:n]),
        },
        schema=SLICE_SCHEMA.with_metadata(
            {**SLICE_SCHEMA.metadata, b"blendsign.source_digest": stored.encode()}
        ),
    )
    with atomic_path(task.out_path) as tmp:
        pq.write_table(  # only hu is compressed: zstd cannot shrink a row group's few bytes of each other column
            table,
            tmp,
            compression={f: task.compression if f == "hu" else "none" for f in SLICE_SCHEMA.names},
            compression_level={"hu": task.compression_level},
            row_group_size=task.rows_per_row_group,
            use_dictionary=["scan_id", "patient_key", "transfer_syntax"],
            write_statistics=[f for f in SLICE_SCHEMA.names if f != "hu"],
        )
    return ScanOutcome(task.scan_id, n, source_digest, False, tuple(quarantined))


def _binary_rows(rows: np.ndarray) -> pa.ChunkedArray:
    """A binary column of the rows of a 2-D uint8 array, without copying them (chunks under 2 GiB: int32 offsets)."""
    n, size = rows.shape
    step = (2**31 - 1) // size
    chunks = []
    for i in range(0, n, step):
        part = rows[i : i + step]
        offsets = np.arange(0, (len(part) + 1) * size, size, dtype=np.int32)
        chunks.append(pa.Array.from_buffers(pa.binary(), len(part), [None, pa.py_buffer(offsets),
                                                                     pa.py_buffer(part)]))
    return pa.chunked_array(chunks, pa.binary())


# --- orchestration -----------------------------------------------------------------------------------

T = TypeVar("T")
R = TypeVar("R")


def _run_parallel(
    fn: Callable[[T], R], items: Sequence[T], pool: Executor | None, desc: str, progress: bool, unit: str
) -> Iterator[tuple[T, R | BaseException]]:
    """Apply ``fn`` to each item (in ``pool`` when given, else in-process); errors are yielded, not raised."""
    bar = progress_bar(total=len(items), desc=desc, unit=unit, enabled=progress)
    try:
        if pool is None:
            for item in items:
                try:
                    result: R | BaseException = fn(item)
                except Exception as exc:
                    result = exc
                bar.update()
                yield item, result
            return
        futures: dict[Future[R], T] = {pool.submit(fn, item): item for item in items}
        for fut in as_completed(futures):
            error = fut.exception()
            if isinstance(error, BrokenProcessPool):  # not the files' fault: stop instead of quarantining them all
                raise RuntimeError(POOL_DIED) from error
            bar.update()
            yield futures[fut], (error if error is not None else fut.result())
    finally:
        bar.close()


POOL_DIED = (
    "the ingest worker pool died (a worker was killed, e.g. out of memory, or could not start). Called from a "
    "Python script with workers > 1? Guard the script's code with `if __name__ == \"__main__\":` (the workers "
    "re-import it). Re-running completes the work: scans already written are kept."
)


def _pool(workers: int) -> Executor | None:
    """Worker processes forked from a server that imported this module once (cheap starts, no inherited threads);
    each exits when the process that made the pool does, even when that one is killed (:func:`_follow`)."""
    if workers <= 1:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_follow, initargs=(os.getpid(),))


def _follow(owner: int) -> None:
    """Worker initializer: exit when process ``owner`` ends.

    A pool worker blocks on its task queue, whose pipe it holds both ends of, so a killed owner (SIGKILL, the
    OOM killer) would leave it waiting for ever. A daemon thread waits on a pidfd of the owner (Linux ≥ 5.3:
    readable once the owner exits; no PID-reuse race) or, elsewhere, polls the owner's PID every second. On
    Linux the worker also asks for SIGTERM when its parent, the fork server, dies.
    """
    import contextlib
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    try:
        pidfd: int | None = os.pidfd_open(owner)
    except (AttributeError, OSError):  # no pidfd here, or the owner is already gone (then the poll ends at once)
        pidfd = None

    def alive() -> bool:
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def watch() -> None:
        if pidfd is not None:
            import select

            select.select([pidfd], [], [])
        else:
            while alive():
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="blendsign-follow-owner", daemon=True).start()


def _chunks(items: Sequence[str], n: int) -> list[list[str]]:
    return [list(items[i : i + n]) for i in range(0, len(items), n)]


CLINICAL = "clinical.csv"
MANIFEST = "manifest.json"
SLICES_DIR = "slices"  # one Parquet file a scan: slices/<scan_id>.parquet (scan_file)
REPORT, REPORT_MD = "ingest_report.json", "ingest_report.md"  # the same counts, as data and as a flow chart


def find_clinical(source: str | Path) -> str | None:
    """The clinical list in or beside ``source`` (a folder or an ``s3://`` prefix), or None: the one lookup for
    the CLI, ``blendsign run`` and the Kubeflow steps."""
    for candidate in (storage.join(source, CLINICAL), storage.sibling(source, CLINICAL)):
        if storage.is_file(candidate):
            return candidate
    return None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """``manifest.json`` of an ingest output (its folder, or the file itself)."""
    path = Path(path)
    return json.loads((path / MANIFEST if path.is_dir() else path).read_text())


def scan_file(out: str | Path, scan_id: str) -> Path:
    """The Parquet file of one scan's slices in an ingest output."""
    return Path(out) / SLICES_DIR / f"{scan_id}.parquet"


def read_report(out: str | Path) -> dict[str, Any]:
    """``ingest_report.json`` of an ingest output: counts, exclusions, quarantined files (no identifiers)."""
    path = Path(out) / REPORT
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not an ingest output (no {REPORT})")
    return dict(json.loads(path.read_text()))


def export_summary(out: str | Path, dest: str | Path) -> Path:
    """Copy an ingest's manifest and report (no slices) into the folder ``dest``: what the light pipeline steps
    read (``read_manifest``, ``read_report``, ``data_fingerprint`` take either folder)."""
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, REPORT):
        shutil.copy2(Path(out) / name, dest / name)
    return dest


def data_fingerprint(path: str | Path) -> str:
    """The ingested dataset's fingerprint (a hash of its manifest: scans, slice counts, source digests)."""
    return str(read_manifest(path)["dataset_fingerprint"])


def ingest(
    source: str | Path,
    out: str | Path,
    cfg: IngestConfig,
    *,
    clinical_csv: str | Path | None = None,
    progress: bool = True,
) -> IngestResult:
    """Ingest every DICOM file under ``source`` into ``out`` (see module docstring). Idempotent."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if cfg.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {cfg.workers}")
    if not source.is_dir():
        raise NotADirectoryError(f"DICOM source {source} is not a folder")
    if clinical_csv and not Path(clinical_csv).is_file():
        raise FileNotFoundError(f"clinical list {clinical_csv} not found")
    found = find_clinical(source) if not clinical_csv else None
    clinical = Path(clinical_csv) if clinical_csv else Path(found) if found else None
    postoperative = read_clinical(clinical) if clinical else set()
    found_files = find_files(source, skip=[out, *([clinical] if clinical else [])])
    files = found_files.files
    if not files:
        reasons = "; ".join(sorted({r for _, r in found_files.unusable}))
        raise InputError(f"no files under {source} that can be read: nothing to ingest"
                         + (f" ({reasons})" if reasons else ""))

    slices_dir = out / SLICES_DIR
    pseudo = load_or_create_key(out)
    _check_same_key(out, pseudo)
    slices_dir.mkdir(parents=True, exist_ok=True)
    storage.clear_complete(out)  # before the first change: a killed run leaves an output no later stage reads
    remove_stale_temporaries(slices_dir)
    if clinical:
        log.info("clinical list: %s (%d postoperative studies)", clinical.name, len(postoperative))
    else:
        log.warning("no clinical.csv given or found beside %s: postoperative exclusion not applied", source)

    log.info("found %d files under %s", len(files), source.name)
    headers: list[SliceHeader] = []
    quarantined: list[tuple[str, str]] = list(found_files.unusable)
    chunks = _chunks([str(p) for p in files], 64)
    outcomes: list[ScanOutcome] = []
    failed: list[dict[str, str]] = []
    pool = _pool(cfg.workers)
    with pool if pool is not None else nullcontext():
        for chunk, res in _run_parallel(read_headers, chunks, pool, "headers", progress, "chunk"):
            if isinstance(res, BaseException):
                quarantined.extend((p, f"header reader failed ({type(res).__name__}: {res})") for p in chunk)
            else:
                headers.extend(res[0])
                quarantined.extend(res[1])

        plan = plan_ingest(headers, postoperative, cfg, pseudo, slices_dir)
        quarantined.extend(plan.quarantined)
        for task, outcome in _run_parallel(write_scan, plan.tasks, pool, "scans", progress, "scan"):
            if isinstance(outcome, BaseException):
                log.error("scan %s failed: %s", task.scan_id, outcome)
                failed.append({"scan_id": task.scan_id, "reason": f"{type(outcome).__name__}: {outcome}"})
                continue
            quarantined.extend(outcome.quarantined)
            if outcome.slices == 0:
                failed.append({"scan_id": task.scan_id, "reason": "no slice of the scan could be decoded"})
            else:
                outcomes.append(outcome)

    written = {o.scan_id for o in outcomes}
    stale = [p for p in slices_dir.glob("*.parquet") if p.stem not in written]
    for p in stale:  # a scan written by an earlier run that this source no longer yields
        p.unlink()
    if stale:
        log.warning("removed %d scans that an earlier run wrote into %s and this source no longer yields",
                    len(stale), out.name)
    if unmatched := len(postoperative - {h.study_uid for h in headers}):
        log.warning("%d postoperative studies of %s match no study under %s", unmatched, clinical.name if clinical
                    else "the clinical list", source.name)
    report = _report(source, plan, outcomes, failed, quarantined, len(files), len(stale), pseudo, cfg)
    manifest = _manifest(outcomes)
    report["dataset_fingerprint"] = manifest["dataset_fingerprint"]
    write_json_atomic(out / MANIFEST, manifest)
    write_json_atomic(out / REPORT, report)
    write_text_atomic(out / REPORT_MD, flow_markdown(report))
    storage.mark_complete(out)
    for q in report["quarantined"]:
        log.warning("quarantined %s: %s", q["file"], q["reason"])
    if report["quarantined"]:
        log.warning("%d files quarantined; `blendsign locate %s %s` lists them by path", len(report["quarantined"]),
                    source.name, out.name)
    return IngestResult(out, report)


def locate(source: str | Path, out: str | Path) -> list[dict[str, str]]:
    """The quarantined and duplicate files of ``out``'s ingest report, by their paths under ``source``.

    Recomputes every source file's pseudonym with the ingest's key; for the person who holds the source
    (rows ``{"file", "pseudonym", "reason"}``, quarantined first). Writes nothing.
    """
    source, out = Path(source).resolve(), Path(out).resolve()
    report = read_report(out)
    pseudo = load_or_create_key(out, create=False)
    _check_same_key(out, pseudo)
    found = find_files(source, skip=[out])
    paths = {_file_name(p, source, pseudo): _relative(p, source) for p in [*map(str, found.files),
                                                                           *(u for u, _ in found.unusable)]}
    unknown = "(not under SOURCE any more)"
    rows = sorted(({"file": paths.get(q["file"], unknown), "pseudonym": q["file"], "reason": q["reason"]}
                   for q in report["quarantined"]), key=lambda r: r["file"])
    rows += [{"file": paths.get(d["file"], unknown), "pseudonym": d["file"],
              "reason": f"duplicate of {paths.get(d['duplicate_of'], d['duplicate_of'])}: {d['why']}"}
             for d in report["duplicates"]]
    return rows


def _check_same_key(out: Path, pseudo: Pseudonymizer) -> None:
    """Refuse to mix pseudonyms: an output ingested under another key would be rewritten scan by scan."""
    if not (out / REPORT).is_file():
        return
    previous = read_report(out).get("key_fingerprint")
    if previous and previous != pseudo.fingerprint:
        raise InputError(f"{out} was ingested with another pseudonym key (fingerprint {previous}, now "
                         f"{pseudo.fingerprint}): use that key, or another output folder")


def _relative(path: str, source: Path) -> str:
    try:
        return str(Path(path).relative_to(source))
    except ValueError:
        return Path(path).name


def locate_slices(source: str | Path, out: str | Path, keys: Iterable[str]) -> dict[str, str | None]:
    """The source file of each slice named by its ``instance_key`` (``review.md``, predictions), by path under
    ``source`` (None: no file there has it). Reads every header of ``source`` with the ingest's key."""
    source, out = Path(source).resolve(), Path(out).resolve()
    wanted = set(keys)
    pseudo = load_or_create_key(out, create=False)
    _check_same_key(out, pseudo)
    headers, _ = read_headers([str(p) for p in find_files(source, skip=[out]).files])
    found = {pseudo.instance(h.sop_uid): _relative(h.path, source) for h in headers}
    return {k: found.get(k) for k in sorted(wanted)}


def _file_name(path: str, source: Path, pseudo: Pseudonymizer) -> str:
    """How reports and logs name a source file: a keyed pseudonym of its path under ``source``."""
    return f"file-{pseudo.file(_relative(path, source))}"


def _scrub(reason: str, source: Path) -> str:
    return reason.replace(str(source) + os.sep, "").replace(str(source), "")


def _report(
    source: Path,
    plan: Plan,
    outcomes: list[ScanOutcome],
    failed: list[dict[str, str]],
    quarantined: list[tuple[str, str]],
    files_found: int,
    stale_removed: int,
    pseudo: Pseudonymizer,
    cfg: IngestConfig,
) -> dict[str, Any]:
    q = sorted({(_file_name(p, source, pseudo), _scrub(r, source)) for p, r in quarantined})
    return {
        "format": FORMAT_VERSION,
        "files_found": files_found,
        "studies_found": plan.studies_found,
        "excluded": {reason: len(ids) for reason, ids in plan.excluded.items()},
        "excluded_scans": sorted(
            ({"scan_id": sid, "reason": reason} for reason, ids in plan.excluded.items() for sid in ids),
            key=lambda d: (d["reason"], d["scan_id"]),
        ),
        "scans_written": len(outcomes),
        "slices_written": sum(o.slices for o in outcomes),
        "scans_reused": sum(o.reused for o in outcomes),
        "scans_failed": sorted(failed, key=lambda d: d["scan_id"]),
        "quarantined": [{"file": f, "reason": r} for f, r in q],
        "duplicates": [
            {"file": _file_name(a, source, pseudo), "duplicate_of": _file_name(b, source, pseudo), "why": why}
            for a, b, why in sorted(plan.duplicates)
        ],
        "series_skipped": dict(sorted(plan.series_skipped.items())),
        "images_skipped": dict(sorted(plan.images_skipped.items())),
        "age_unknown_scans": plan.age_unknown,
        "patient_id_missing_scans": plan.patient_id_missing,
        "stale_scans_removed": stale_removed,
        "key_fingerprint": pseudo.fingerprint,
        "config": asdict(cfg),
    }


def _manifest(outcomes: list[ScanOutcome]) -> dict[str, Any]:
    scans = [{"scan_id": o.scan_id, "file": f"{SLICES_DIR}/{o.scan_id}.parquet", "slices": o.slices,
              "source_digest": o.digest} for o in sorted(outcomes, key=lambda o: o.scan_id)]
    fingerprint = hashlib.sha256(json.dumps(scans, sort_keys=True).encode()).hexdigest()
    return {"format": FORMAT_VERSION, "scans": scans, "dataset_fingerprint": fingerprint}


_REASON_TEXT = {
    "postoperative": "postoperative patient",
    "not_head_ct": "not a head CT",
    "no_noncontrast_axial_series": "no non-contrast axial series",
}


_SERIES_TEXT = {
    "not_head": "not a head CT (ingest.head rules)",
    "derived": "derived or secondary (MIP, reformat, perfusion map, screen save, …)",
    "non_axial": "not axial",
    "contrast": "contrast-enhanced",
    "localizer": "localizer",
    "extra_axial_series": "another axial series of the study was chosen",
}


def flow_markdown(report: dict[str, Any]) -> str:
    """The selection flow (paper Figure 2) as Markdown."""
    excluded = report["excluded"]
    total_excl = sum(excluded.values())
    lines = [
        "# Ingestion flow",
        "",
        "```",
        f"{report['studies_found']:>6} studies found ({report['files_found']} files)",
        f"{total_excl:>6} excluded",
    ]
    for reason, n in excluded.items():
        text = _REASON_TEXT.get(reason, reason.replace("age_lt_", "patient younger than "))
        lines.append(f"         ├─ {n:>4}  {text}")
    failed = report["scans_failed"]
    if failed:
        lines.append(f"{len(failed):>6} failed (no slice could be decoded: see below)")
    lines += [
        f"{report['scans_written']:>6} scans written, {report['slices_written']} slices"
        f" = {report['studies_found']} − {total_excl}" + (f" − {len(failed)}" if failed else ""),
        "```",
        "",
        "| not used | count |",
        "|---|---:|",
    ]
    for reason, n in report["series_skipped"].items():
        lines.append(f"| series skipped: {_SERIES_TEXT.get(reason, reason)} | {n} |")
    for reason, n in report["images_skipped"].items():
        lines.append(f"| images skipped: {reason} | {n} |")
    lines += [
        f"| duplicate files (same SOPInstanceUID) | {len(report['duplicates'])} |",
        f"| … of which a lossy copy, the lossless one kept | "
        f"{sum(d['why'].startswith('kept the lossless') for d in report['duplicates'])} |",
        f"| quarantined files | {len(report['quarantined'])} |",
        f"| scans that failed | {len(failed)} |",
        f"| scans written of unknown age (no PatientAge, no birth date) | {report['age_unknown_scans']} |",
        "",
    ]
    if failed:
        lines += ["## Scans that failed", "", "| scan | reason |", "|---|---|"]
        lines += [f"| `{f['scan_id']}` | {f['reason']} |" for f in failed]
        lines.append("")
    if report["quarantined"]:
        lines += ["## Quarantined files", "", "Files are named by keyed pseudonyms; `blendsign locate SOURCE OUT` "
                  "lists them by path for whoever holds the source.", "", "| file | reason |", "|---|---|"]
        lines += [f"| `{q['file']}` | {q['reason']} |" for q in report["quarantined"]]
        lines.append("")
    return "\n".join(lines)
