"""Readers' labels: agreement (Fleiss' κ), majority-vote fusion, box fusion, importers.

Paper §Data collection and labeling: three radiologists label every slice; the gold standard is the
majority vote; agreement is reported as Fleiss' κ per class (Table 2).

Native annotation CSV (one row per reader per slice per box)::

    study_instance_uid,sop_instance_uid,reader,label,x_min,y_min,x_max,y_max

``label`` is that reader's slice label; the box is in pixels of the original slice (x = column,
y = row, continuous edges: 0 ≤ x_min < x_max ≤ cols), empty on a row without a box. Error messages
name CSV rows by their line number in the file (the header is row 1).
"""

from __future__ import annotations

import ast
import csv
import io
import itertools
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from blendsign import CLASSES  # the order of every votes vector
from blendsign.config import LabelConfig
from blendsign.deid import Pseudonymizer, load_or_create_key
from blendsign.errors import InputError
from blendsign.ingest import SLICES_DIR, read_report
from blendsign.storage import atomic_path, require_complete, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def _check_counts(counts: np.ndarray) -> tuple[np.ndarray, int]:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError("counts must be a non-empty [subjects, categories] matrix")
    raters = counts.sum(axis=1)
    if not np.all(raters == raters[0]) or raters[0] < 2:
        raise ValueError("every subject must be rated by the same number (≥ 2) of raters")
    return counts, int(raters[0])


def fleiss_kappa(counts: np.ndarray) -> float:
    """Overall Fleiss' κ (Fleiss 1971, eq. 1–9).

    Args:
        counts: ``[N, k]``, ``counts[i, j]`` = raters who put subject i in category j; rows sum to n.
    """
    counts, n = _check_counts(counts)
    p_j = counts.sum(axis=0) / counts.sum()
    p_i = ((counts**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar, p_e = p_i.mean(), float((p_j**2).sum())
    if p_e == 1.0:
        return float("nan")  # one category only: κ undefined
    return float((p_bar - p_e) / (1.0 - p_e))


def category_kappas(counts: np.ndarray) -> np.ndarray:
    """Category-specific Fleiss' κ_j (Fleiss 1971, eq. 10): category j against the rest, shape ``[k]``."""
    counts, n = _check_counts(counts)
    N = counts.shape[0]
    p_j = counts.sum(axis=0) / (N * n)
    disagreement = (counts * (n - counts)).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = 1.0 - disagreement / (N * n * (n - 1) * p_j * (1.0 - p_j))
    return np.where((p_j > 0) & (p_j < 1), kappa, np.nan)


# --- majority vote (paper §Data collection and labeling) ---------------------------------------------

TIE_PRECEDENCE: tuple[str, ...] = ("normal_ich", "blend_sign", "non_ich")  # who wins a tie for the plurality
PAPER_SLICE_COUNTS: dict[str, int] = {"non_ich": 8864, "normal_ich": 3965, "blend_sign": 447}  # paper Table 2


def majority_vote(votes: Sequence[int]) -> tuple[str, bool]:
    """Gold label of one slice from its votes ``[non_ich, normal_ich, blend_sign]``: (label, contested).

    The class with the most votes wins (with three readers: the majority, paper §Data collection and
    labeling). A tie for the most votes is ``contested`` and resolved by ``TIE_PRECEDENCE``
    (normal_ich > blend_sign > non_ich): the paper's three-way split 1–1–1 gives ``normal_ich``; a tie
    between blend_sign and non_ich (even reader counts only) keeps the finding.
    """
    if len(votes) != len(CLASSES) or min(votes) < 0 or sum(votes) == 0:
        raise ValueError(f"votes must be {len(CLASSES)} non-negative counts with at least one vote: {votes}")
    top = max(votes)
    tied = [c for c, v in zip(CLASSES, votes, strict=True) if v == top]
    if len(tied) == 1:
        return tied[0], False
    return next(c for c in TIE_PRECEDENCE if c in tied), True


def reader_label(labels: Iterable[str]) -> str | None:
    """One reader's label for a slice from all their rows on it; ``None`` if they contradict themselves.

    normal_ich together with blend_sign means blend sign (the reader marked a blend-sign region and
    another haemorrhage); non_ich together with either ICH class is a contradiction.
    """
    found = set(labels)
    if not found or not found <= set(CLASSES):
        raise InputError(f"labels must be a non-empty subset of {CLASSES}: {sorted(found)}")
    if "non_ich" in found:
        return "non_ich" if len(found) == 1 else None
    return "blend_sign" if "blend_sign" in found else "normal_ich"


# --- boxes -------------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]  # (x_min, y_min, x_max, y_max) in pixels; x = column, y = row


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (continuous pixel coordinates, area = width × height)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_boxes(boxes: Sequence[Sequence[Box]], min_iou: float) -> list[list[tuple[int, int]]]:
    """Group readers' boxes on one slice into regions; ``boxes[r]`` are reader r's boxes.

    Greedy complete-linkage clustering: every box starts alone; candidate pairs of boxes of different
    readers with IoU ≥ ``min_iou`` are visited by decreasing IoU (ties by reader, then box index), and
    their two regions merge when they share no reader and every cross pair has IoU ≥ ``min_iou``. So a
    region holds at most one box per reader, all mutually overlapping. Returns regions as lists of
    ``(reader, box index)``, ordered by their first member.
    """
    items = [(r, i) for r, bs in enumerate(boxes) for i in range(len(bs))]
    box = {it: boxes[it[0]][it[1]] for it in items}
    pairs = sorted(
        (-v, a, b)
        for n, a in enumerate(items)
        for b in items[n + 1 :]
        if a[0] != b[0] and (v := iou(box[a], box[b])) >= min_iou
    )
    region = {it: [it] for it in items}  # item → its region's member list (shared object)
    for _, a, b in pairs:
        ra, rb = region[a], region[b]
        if ra is rb or {r for r, _ in ra} & {r for r, _ in rb}:
            continue
        if all(iou(box[x], box[y]) >= min_iou for x in ra for y in rb):
            ra.extend(rb)
            for it in rb:
                region[it] = ra
    unique = {id(m): m for m in region.values()}.values()
    return sorted((sorted(m) for m in unique), key=lambda m: m[0])


@dataclass(frozen=True)
class FusedBox:
    """A region kept by a majority of readers: the mean of their boxes, in pixels of the original slice."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    readers: int

    def as_dict(self) -> dict[str, float | int]:
        """Center ``cx, cy``, extents ``left, right, top, bottom`` (center to each side), corners, readers."""
        cx, cy = (self.x_min + self.x_max) / 2, (self.y_min + self.y_max) / 2
        return {
            "cx": cx, "cy": cy, "left": cx - self.x_min, "right": self.x_max - cx,
            "top": cy - self.y_min, "bottom": self.y_max - cy,
            "x_min": self.x_min, "y_min": self.y_min, "x_max": self.x_max, "y_max": self.y_max,
            "readers": self.readers,
        }


def fuse_boxes(boxes: Sequence[Sequence[Box]], n_readers: int, min_iou: float) -> list[FusedBox]:
    """Regions (``match_boxes``) drawn by more than half of the slice's ``n_readers``, each the mean box."""
    fused = []
    for members in match_boxes(boxes, min_iou):
        if 2 * len(members) <= n_readers:
            continue
        x_min, y_min, x_max, y_max = np.array([boxes[r][i] for r, i in members], dtype=np.float64).mean(axis=0).tolist()
        fused.append(FusedBox(x_min, y_min, x_max, y_max, readers=len(members)))
    return sorted(fused, key=lambda f: (f.y_min + f.y_max, f.x_min + f.x_max, f.x_min, f.y_min))


# --- annotation CSV ----------------------------------------------------------------------------------

ANNOTATION_COLUMNS: tuple[str, ...] = (
    "study_instance_uid", "sop_instance_uid", "reader", "label", "x_min", "y_min", "x_max", "y_max",
)
BOX_COLUMNS: tuple[str, ...] = ("x_min", "y_min", "x_max", "y_max")
_ROWS_SHOWN = 20  # row numbers listed per problem in an error message


def _lines(rows: Iterable[int]) -> str:
    """CSV line numbers for a message: the first few, and how many more."""
    rs = sorted(set(rows))
    return ", ".join(map(str, rs[:_ROWS_SHOWN])) + (f" (+{len(rs) - _ROWS_SHOWN} more)" if len(rs) > _ROWS_SHOWN
                                                     else "")


class _Problems:
    """Collects ``problem → CSV rows`` and raises them as one ``ValueError``."""

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        self.rows: dict[str, list[int]] = defaultdict(list)

    def add(self, problem: str, rows: Iterable[int]) -> None:
        self.rows[problem].extend(rows)

    def raise_if_any(self) -> None:
        if not self.rows:
            return
        lines = []
        for problem, rows in self.rows.items():
            lines.append(f"  {problem}: row{'s' if len(set(rows)) > 1 else ''} {_lines(rows)}")
        head = f"{self.source}: invalid input (rows are CSV line numbers, header = 1):\n"
        raise InputError(head + "\n".join(lines))


def _read_csv(path: str | Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, stripped row)`` for each record of a CSV with at least the ``required`` columns.

    A generator (the RSNA file has 4.5 M rows); rows with a wrong field count raise at the end.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such CSV file: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in required if c not in header]
            if missing:
                raise InputError(f"{path}: missing column(s) {missing}; expected {list(required)}")
            reader.fieldnames = header
            problems = _Problems(path)
            for rec in reader:
                if None in rec or None in rec.values():
                    problems.add(f"wrong number of fields (expected {len(header)})", [reader.line_num])
                    continue
                yield reader.line_num, {k: v.strip() for k, v in rec.items()}
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text CSV ({exc.reason})") from None
    problems.raise_if_any()


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Annotation:
    """One validated row of the native annotation CSV."""

    row: int  # CSV line number (header = 1)
    study_instance_uid: str
    sop_instance_uid: str
    reader: str
    label: str
    box: Box | None


def read_annotations(path: str | Path) -> list[Annotation]:
    """Read and validate the native annotation CSV; raises ``ValueError`` naming the offending rows.

    Checked here: known label, sop_instance_uid and reader present, a box filled in all four or none
    of its columns with numbers and ``x_min < x_max``, ``y_min < y_max``, no box on a non_ich row,
    one StudyInstanceUID per SOPInstanceUID. Image bounds need the ingested slice (``fuse``).
    """
    problems = _Problems(path)
    out: list[Annotation] = []
    study_of: dict[str, tuple[str, int]] = {}
    for row, rec in _read_csv(path, ANNOTATION_COLUMNS):
        sop, reader, label = rec["sop_instance_uid"], rec["reader"], rec["label"]
        study = rec["study_instance_uid"]
        if not sop or not reader:
            problems.add("empty sop_instance_uid or reader", [row])
            continue
        if label not in CLASSES:
            problems.add(f"unknown label (expected one of {', '.join(CLASSES)})", [row])
            continue
        filled = [rec[c] for c in BOX_COLUMNS if rec[c]]
        box: Box | None = None
        if 0 < len(filled) < 4:
            problems.add("partially filled box (give all of x_min, y_min, x_max, y_max or none)", [row])
            continue
        if filled:
            values = [v for c in BOX_COLUMNS if (v := _number(rec[c])) is not None]
            if len(values) != 4:
                problems.add("box coordinate is not a finite number", [row])
                continue
            box = (values[0], values[1], values[2], values[3])
            if not (box[0] < box[2] and box[1] < box[3]):
                problems.add("empty or inverted box (need x_min < x_max and y_min < y_max)", [row])
                continue
            if label == "non_ich":
                problems.add("box on a non_ich row (a reader contradicts themselves)", [row])
                continue
        if study:
            first = study_of.setdefault(sop, (study, row))
            if first[0] != study:
                problems.add("one sop_instance_uid under two study_instance_uids", [first[1], row])
        out.append(Annotation(row, study, sop, reader, label, box))
    problems.raise_if_any()
    if not out:
        raise InputError(f"{path}: no annotations")
    return out


# --- ingested slices ---------------------------------------------------------------------------------

_SLICE_COLUMNS = ["scan_id", "patient_key", "slice_index", "instance_key", "rows", "cols"]


def read_ingested_slices(ingest_dir: str | Path) -> tuple[dict[str, dict[str, Any]], Pseudonymizer]:
    """Ingested slices by ``instance_key`` (never reading ``hu``) and the ingest's pseudonymizer.

    The key (``BLENDSIGN_PSEUDONYM_KEY`` or the key file beside ``ingest_dir``) must have the
    fingerprint recorded in ``ingest_report.json``: with another key no annotation would join.
    """
    import pyarrow.dataset as ds

    ingest_dir = Path(ingest_dir)
    slices_dir = ingest_dir / SLICES_DIR
    if not slices_dir.is_dir():
        raise FileNotFoundError(f"{ingest_dir} is not an ingest output (no {SLICES_DIR}/)")
    expected = read_report(ingest_dir).get("key_fingerprint")
    require_complete(ingest_dir, "ingest")
    pz = load_or_create_key(ingest_dir, create=False)
    if pz.fingerprint != expected:
        raise InputError(
            f"pseudonym key fingerprint {pz.fingerprint} differs from the ingest's {expected}: this is not "
            "the key the ingest used, so no annotation would join (set BLENDSIGN_PSEUDONYM_KEY or use the "
            "ingest's key file)"
        )
    if not any(slices_dir.glob("*.parquet")):
        raise InputError(f"{ingest_dir} holds no ingested slice: every scan was excluded or quarantined "
                         "(see its ingest_report.md)")
    table = ds.dataset(str(slices_dir), format="parquet").to_table(columns=_SLICE_COLUMNS)
    slices: dict[str, dict[str, Any]] = {}
    for rec in table.to_pylist():
        if rec["instance_key"] in slices:
            raise InputError(f"{slices_dir}: instance_key {rec['instance_key']} occurs twice")
        slices[rec["instance_key"]] = rec
    return slices, pz


# --- fuse --------------------------------------------------------------------------------------------

BOX_TYPE = pa.struct(
    [(name, pa.float64()) for name in ("cx", "cy", "left", "right", "top", "bottom", *BOX_COLUMNS)]
    + [("readers", pa.int32())]
)
LABELS_SCHEMA = pa.schema([
    ("scan_id", pa.string()),
    ("patient_key", pa.string()),
    ("slice_index", pa.int32()),
    ("instance_key", pa.string()),
    ("rows", pa.int32()),
    ("cols", pa.int32()),
    ("label", pa.string()),
    ("votes", pa.list_(pa.int32())),  # readers per class, in CLASSES order
    ("n_readers", pa.int32()),
    ("contested", pa.bool_()),
    ("boxes", pa.list_(BOX_TYPE)),
])


@dataclass(frozen=True)
class FuseResult:
    """What ``fuse`` wrote and found; the same numbers are in ``agreement.json``."""

    out_dir: Path
    slices: int  # labelled slices in labels.parquet
    readers: int  # distinct readers
    gold_counts: dict[str, int]
    contested: int
    kappa: dict[str, float | None]  # non_ich, normal_ich, blend_sign, overall (None: undefined)
    kappa_slices: int  # slices rated by all readers (the κ sample)
    annotation_rows: int
    unmatched_rows: int  # annotation rows whose slice is not in the ingest (excluded there, or a wrong UID)
    unmatched_slices: int
    unmatched_in_ingested_studies: tuple[int, ...]  # CSV lines of those whose study *was* ingested: suspicious
    unannotated_slices: int  # ingested slices nobody annotated
    fused_boxes: int

    def summary(self) -> str:
        counts = ", ".join(f"{c} {self.gold_counts[c]}" for c in CLASSES)
        k = self.kappa["overall"]
        return (
            f"fused {self.slices} slices from {self.readers} reader(s): {counts}; "
            f"{self.contested} contested; Fleiss' κ {'n/a' if k is None else f'{k:.3f}'} over "
            f"{self.kappa_slices} slices; {self.fused_boxes} boxes; {self.unmatched_rows} annotation rows "
            f"({self.unmatched_slices} slices) not ingested; {self.unannotated_slices} ingested slices "
            f"unannotated → {self.out_dir}"
        )


def _kappas(votes: np.ndarray) -> dict[str, float | None]:
    """Category-specific and overall Fleiss' κ of a ``[slices, classes]`` vote matrix (None: undefined)."""
    if votes.shape[0] == 0 or votes.sum(axis=1)[0] < 2:
        return {c: None for c in (*CLASSES, "overall")}
    values = [*category_kappas(votes), fleiss_kappa(votes)]
    names = (*CLASSES, "overall")
    return {c: None if math.isnan(v) else float(v) for c, v in zip(names, values, strict=True)}


LABELS_FILE = "labels.parquet"
AGREEMENT, AGREEMENT_MD = "agreement.json", "agreement.md"  # κ and the fuse report; the same as Table 2


def read_agreement(labels_dir: str | Path) -> dict[str, Any]:
    """``agreement.json`` of a ``fuse`` output: readers, Fleiss' κ per class, gold counts."""
    return dict(json.loads((Path(labels_dir) / AGREEMENT).read_text()))


def fuse(
    annotations: str | Path, ingest_dir: str | Path, out_dir: str | Path, cfg: LabelConfig | None = None
) -> FuseResult:
    """Gold labels and boxes per slice from readers' annotations (paper §Data collection and labeling).

    Joins the CSV to the ingest by ``instance_key = Pseudonymizer.instance(sop_instance_uid)``; writes
    ``labels.parquet`` (``LABELS_SCHEMA``, pseudonyms only), ``agreement.json`` (κ, counts and the fuse
    report: unmatched annotations, unannotated slices, boxes) and ``agreement.md`` (Table 2 style).
    Everything is validated before anything is written; each file is replaced atomically.
    """
    cfg = cfg or LabelConfig()
    out_dir = Path(out_dir)
    anns = read_annotations(annotations)
    slices, pz = read_ingested_slices(ingest_dir)
    key_of = {sop: pz.instance(sop) for sop in sorted({a.sop_instance_uid for a in anns})}
    joined = [(key_of[a.sop_instance_uid], a) for a in anns if key_of[a.sop_instance_uid] in slices]
    unmatched = [a for a in anns if key_of[a.sop_instance_uid] not in slices]
    ingested_scans = {s["scan_id"] for s in slices.values()}
    suspicious = tuple(a.row for a in unmatched if a.study_instance_uid
                       and pz.scan(a.study_instance_uid) in ingested_scans)
    if suspicious:
        log.warning("%d annotation rows name a slice that is not in the ingest although its study is (a quarantined "
                    "file, or a SOPInstanceUID that matches no file?): CSV lines %s", len(suspicious),
                    _lines(suspicious))

    problems = _Problems(annotations)
    for key, a in joined:
        s = slices[key]
        if a.study_instance_uid and pz.scan(a.study_instance_uid) != s["scan_id"]:
            problems.add("study_instance_uid is not the study of this slice in the ingest", [a.row])
        box = a.box
        if box is not None and (min(box[0], box[1]) < 0 or box[2] > s["cols"] or box[3] > s["rows"]):
            problems.add("box outside the image (0 ≤ x ≤ cols, 0 ≤ y ≤ rows of the ingested slice)", [a.row])

    readers = sorted({a.reader for _, a in joined})
    records: list[dict[str, Any]] = []
    reader_boxes = 0
    joined.sort(key=lambda ka: (ka[0], ka[1].reader, ka[1].row))
    for key, group in itertools.groupby(joined, key=lambda ka: ka[0]):
        votes = [0] * len(CLASSES)
        boxes: list[list[Box]] = []
        for _, same_reader in itertools.groupby([a for _, a in group], key=lambda a: a.reader):
            rows = list(same_reader)
            label = reader_label(a.label for a in rows)
            if label is None:
                problems.add("a reader labels one slice both non_ich and ICH", [a.row for a in rows])
                continue
            votes[CLASSES.index(label)] += 1
            boxes.append([a.box for a in rows if a.box is not None])
            reader_boxes += len(boxes[-1])
        if not boxes:
            continue
        gold, contested = majority_vote(votes)
        n = sum(votes)
        fused = [] if gold == "non_ich" else fuse_boxes(boxes, n, cfg.box_match_iou)
        s = slices[key]
        records.append({
            "scan_id": s["scan_id"], "patient_key": s["patient_key"], "slice_index": s["slice_index"],
            "instance_key": key, "rows": s["rows"], "cols": s["cols"], "label": gold, "votes": votes,
            "n_readers": n, "contested": contested, "boxes": [f.as_dict() for f in fused],
        })
    problems.raise_if_any()
    if not records:
        raise InputError(f"{annotations}: no annotation matches an ingested slice of {ingest_dir}")
    records.sort(key=lambda r: (r["scan_id"], r["slice_index"], r["instance_key"]))

    vote_matrix = np.array([r["votes"] for r in records if r["n_readers"] == len(readers)], dtype=np.int64)
    gold_counts = {c: sum(r["label"] == c for r in records) for c in CLASSES}
    result = FuseResult(
        out_dir=out_dir,
        slices=len(records),
        readers=len(readers),
        gold_counts=gold_counts,
        contested=sum(r["contested"] for r in records),
        kappa=_kappas(vote_matrix.reshape(-1, len(CLASSES))),
        kappa_slices=int(vote_matrix.shape[0]),
        annotation_rows=len(anns),
        unmatched_rows=len(unmatched),
        unmatched_slices=len({a.sop_instance_uid for a in unmatched}),
        unmatched_in_ingested_studies=suspicious,
        unannotated_slices=len(slices) - len(records),
        fused_boxes=sum(len(r["boxes"]) for r in records),
    )
    report = {
        "fleiss_kappa": result.kappa,
        "kappa_slices": result.kappa_slices,
        "readers": result.readers,
        "slices": result.slices,
        "gold_counts": gold_counts,
        "contested": result.contested,
        "annotation_rows": result.annotation_rows,
        "unmatched_annotations": {"rows": result.unmatched_rows, "slices": result.unmatched_slices,
                                  "rows_in_ingested_studies": len(suspicious), "csv_lines": list(suspicious[:100])},
        "unannotated_ingested_slices": result.unannotated_slices,
        "boxes": {
            "reader_boxes": reader_boxes,
            "fused": result.fused_boxes,
            "ich_slices_without_box": sum(r["label"] != "non_ich" and not r["boxes"] for r in records),
            "box_match_iou": cfg.box_match_iou,
        },
        "key_fingerprint": pz.fingerprint,
        "paper_gold_counts": PAPER_SLICE_COUNTS,
    }
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / LABELS_FILE) as tmp:
        pq.write_table(pa.Table.from_pylist(records, schema=LABELS_SCHEMA), tmp)
    write_json_atomic(out_dir / AGREEMENT, report)
    write_text_atomic(out_dir / AGREEMENT_MD, agreement_markdown(result))
    return result


def agreement_markdown(result: FuseResult) -> str:
    """The agreement table for people, in the style of the paper's Table 2."""

    def kappa(c: str) -> str:
        k = result.kappa[c]
        return "n/a" if k is None else f"{k:.3f}"

    total = max(result.slices, 1)
    lines = [
        "# Reader agreement and gold standard",
        "",
        f"Gold standard: majority vote of {result.readers} reader(s) per slice (paper §Data collection and "
        "labeling). Fleiss' κ per class is the category-specific κ (class against the rest); κ is computed "
        f"over the {result.kappa_slices} slices rated by all readers.",
        "",
        "| Class | Slices (gold) | Share | Fleiss' κ | Paper slices (reference) |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in CLASSES:
        n = result.gold_counts[c]
        lines.append(f"| {c} | {n:,} | {100 * n / total:.1f}% | {kappa(c)} | {PAPER_SLICE_COUNTS[c]:,} |")
    paper_total = sum(PAPER_SLICE_COUNTS.values())
    lines += [
        f"| **overall** | {result.slices:,} | 100.0% | {kappa('overall')} | {paper_total:,} |",
        "",
        f"- Contested slices (no plurality, e.g. a 1–1–1 split → normal_ich): {result.contested:,}",
        f"- Fused boxes: {result.fused_boxes:,}",
        f"- Annotation rows for slices not in the ingest: {result.unmatched_rows:,} "
        f"({result.unmatched_slices:,} slices); of these, rows of studies that *were* ingested (a quarantined "
        f"file, or a SOPInstanceUID that matches no file?): {len(result.unmatched_in_ingested_studies):,}"
        + (f", CSV lines {_lines(result.unmatched_in_ingested_studies)}" if result.unmatched_in_ingested_studies
           else ""),
        f"- Ingested slices without any annotation: {result.unannotated_slices:,}",
        "",
    ]
    return "\n".join(lines)


# --- importers ---------------------------------------------------------------------------------------

RSNA_SUBTYPES: tuple[str, ...] = (
    "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any",
)
_RSNA_ID = re.compile(r"^(ID_[0-9A-Za-z]+)_([a-z]+)$")
BHX_COLUMNS: tuple[str, ...] = (
    "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "data", "labelName", "labelType",
)
IMPORT_FORMATS: tuple[str, ...] = ("rsna", "bhx")


@dataclass(frozen=True)
class ImportResult:
    """What ``import_annotations`` read and wrote."""

    fmt: str
    out_csv: Path
    rows_read: int
    rows_written: int
    images: int
    boxes: int
    label_counts: dict[str, int]

    def summary(self) -> str:
        counts = ", ".join(f"{c} {n}" for c, n in self.label_counts.items())
        return (
            f"imported {self.fmt}: {self.rows_read} rows → {self.rows_written} annotation rows for "
            f"{self.images} images ({counts}; {self.boxes} boxes) → {self.out_csv}"
        )


def read_rsna(path: str | Path) -> list[Annotation]:
    """RSNA ICH ``stage_2_train.csv`` (``ID,Label``, six rows per image) as one consensus reader ``rsna``.

    ``ID_<image>_<subtype>``: the image ID keeps its ``ID_`` prefix, because that is the
    SOPInstanceUID stored in the RSNA DICOM files. ``any`` = 0 → non_ich, 1 → normal_ich (RSNA has no
    blend-sign label). The file has no StudyInstanceUID, so it is left empty, and no boxes. Exact
    duplicate rows (present in the released file) are ignored; conflicting ones are an error.
    """
    return _rsna(path)[0]


def _rsna(path: str | Path) -> tuple[list[Annotation], int]:
    """RSNA annotations and the number of CSV rows read."""
    problems = _Problems(path)
    n = 0
    bit = {s: 1 << i for i, s in enumerate(RSNA_SUBTYPES)}
    images: dict[str, list[int]] = {}  # image → [subtypes seen, subtypes positive, first row] as bit masks
    for row, rec in _read_csv(path, ("ID", "Label")):
        n += 1
        m = _RSNA_ID.match(rec["ID"])
        if not m or m.group(2) not in bit:
            problems.add(f"ID is not ID_<image>_<subtype> with subtype in {', '.join(RSNA_SUBTYPES)}", [row])
            continue
        if rec["Label"] not in ("0", "1"):
            problems.add("Label is not 0 or 1", [row])
            continue
        state = images.setdefault(m.group(1), [0, 0, row])
        b, is_positive = bit[m.group(2)], rec["Label"] == "1"
        if state[0] & b and bool(state[1] & b) != is_positive:
            problems.add("conflicting duplicate of an earlier ID", [row])
        state[0] |= b
        state[1] |= b if is_positive else 0
    out = []
    complete, any_bit = (1 << len(RSNA_SUBTYPES)) - 1, bit["any"]
    for image, (seen, positive, row) in images.items():
        if seen != complete:
            problems.add(f"image without all {len(RSNA_SUBTYPES)} subtype rows (its first row shown)", [row])
        elif bool(positive & any_bit) != bool(positive & ~any_bit):
            problems.add("'any' disagrees with the subtype labels (the image's first row shown)", [row])
        else:
            label = "normal_ich" if positive & any_bit else "non_ich"
            out.append(Annotation(row, "", image, "rsna", label, None))
    problems.raise_if_any()
    return out, n


def read_bhx(path: str | Path) -> list[Annotation]:
    """BHX bounding-box CSV: one box per row, reader ``bhx``, label normal_ich (BHX has no blend sign).

    ``data`` is a Python dict literal ``{'x': .., 'y': .., 'width': .., 'height': ..}`` in pixels with a
    top-left origin, parsed with ``ast.literal_eval``; the box is ``(x, y, x + width, y + height)``.
    """
    return _bhx(path)[0]


def _bhx(path: str | Path) -> tuple[list[Annotation], int]:
    """BHX annotations and the number of CSV rows read."""
    problems = _Problems(path)
    out = []
    n = 0
    for row, rec in _read_csv(path, BHX_COLUMNS):
        n += 1
        if not rec["SOPInstanceUID"]:
            problems.add("empty SOPInstanceUID", [row])
            continue
        try:
            data = ast.literal_eval(rec["data"])
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            data = None
        keys = ("x", "y", "width", "height")
        values = [v for k in keys if (v := _number(str(data.get(k)))) is not None] if isinstance(data, dict) else []
        if len(values) != 4:
            problems.add("data is not a dict with numeric x, y, width, height", [row])
            continue
        x, y, w, h = values
        if w <= 0 or h <= 0:
            problems.add("box with width or height ≤ 0", [row])
            continue
        out.append(Annotation(row, rec["StudyInstanceUID"], rec["SOPInstanceUID"], "bhx", "normal_ich",
                              (x, y, x + w, y + h)))
    problems.raise_if_any()
    return out, n


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def annotations_csv(annotations: Iterable[Annotation]) -> str:
    """Annotations as the native CSV text (``ANNOTATION_COLUMNS``; integral coordinates without ``.0``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ANNOTATION_COLUMNS)
    for a in annotations:
        box = ["", "", "", ""] if a.box is None else [_fmt(v) for v in a.box]
        writer.writerow([a.study_instance_uid, a.sop_instance_uid, a.reader, a.label, *box])
    return buf.getvalue()


def import_annotations(fmt: str, src: str | Path, out_csv: str | Path) -> ImportResult:
    """Convert a public dataset's labels (``rsna`` or ``bhx``) to the native annotation CSV (atomic write)."""
    if fmt not in IMPORT_FORMATS:
        raise InputError(f"unknown annotation format {fmt!r}; choose one of {list(IMPORT_FORMATS)}")
    anns, rows_read = _rsna(src) if fmt == "rsna" else _bhx(src)
    if not anns:
        raise InputError(f"{src}: no annotations")
    write_text_atomic(out_csv, annotations_csv(anns))
    return ImportResult(
        fmt=fmt,
        out_csv=Path(out_csv),
        rows_read=rows_read,
        rows_written=len(anns),
        images=len({a.sop_instance_uid for a in anns}),
        boxes=sum(a.box is not None for a in anns),
        label_counts={c: n for c in CLASSES if (n := sum(a.label == c for a in anns))},
    )
