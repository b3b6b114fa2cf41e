"""Embedded, deterministic synthetic head-CT cohort (``blendsign synth``).

Three steps, each a function of the config and explicitly seeded ``numpy.random.Generator`` s:

1. :func:`plan_cohort` — patients, studies, series, hematomas per slice and the three readers' slice
   labels. No pixels, so class ratio and reader agreement can be checked on hundreds of scans at once.
2. :func:`render_axial` — one axial slice in HU (vectorised numpy) and each hemorrhage's visible mask.
3. :func:`synthesize` — renders and writes every series as DICOM, then the tables below.

Output layout (folder and file names carry no identifier)::

    OUT/dicom/st0007/se02/im0003.dcm  CT Image Storage; Explicit VR LE or RLE Lossless; some lack ".dcm"
    OUT/annotations.csv               study_instance_uid,sop_instance_uid,reader,label,x_min,y_min,x_max,y_max
    OUT/clinical.csv                  study_instance_uid,postoperative (true/false, every study)
    OUT/truth.parquet                 one row per annotated axial slice (:data:`TRUTH_SCHEMA`)
    OUT/synth_manifest.json           config, seed, counts

Boxes are pixel coordinates of the original slice, x = column, y = row, half-open: a box covers columns
``x_min <= x < x_max`` and rows ``y_min <= y < y_max`` (pixel edges, as ``labels``: 0 ≤ x_min < x_max ≤ cols).
One box per visible hemorrhage (an SAH's blood-filled sulci near one spot form one region). Annotation
rows without a box (a reader's non-ICH call) leave the four box columns empty. Every file is written to a
temporary name in its folder and moved into place with ``os.replace``; the same config and seed give
byte-identical files. Point ``blendsign ingest`` at ``OUT/dicom``: it finds ``clinical.csv`` beside it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless, generate_uid

from blendsign import CLASSES  # class index order, as class_ratio's
from blendsign.config import SynthConfig
from blendsign.dicom import CT_IMAGE_STORAGE
from blendsign.errors import ConfigError
from blendsign.labels import ANNOTATION_COLUMNS
from blendsign.storage import write_bytes_atomic

log = logging.getLogger(__name__)

HEMORRHAGE_TYPES = ("EDH", "SDH", "SAH", "IPH", "IVH")
EXCLUSIONS = ("age_lt_7", "no_noncontrast_axial_series", "postoperative")
MANIFEST = "synth_manifest.json"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1"  # pydicom's implementation class UID
HEAD_HEIGHT_MM = 150.0  # skull base (normalised height t = 0) to vertex (t = 1)
SCALP_MM = 5.0
_BOX = pa.struct([(k, pa.int32()) for k in ("x_min", "y_min", "x_max", "y_max")])
TRUTH_SCHEMA = pa.schema([
    ("study_instance_uid", pa.string()),
    ("series_instance_uid", pa.string()),
    ("sop_instance_uid", pa.string()),
    ("patient_id", pa.string()),
    ("file", pa.string()),  # path relative to OUT
    ("instance_number", pa.int32()),
    ("z_index", pa.int32()),  # 0-based position in ascending patient z (inferior → superior)
    ("label", pa.string()),  # true class, one of CLASSES
    ("hemorrhage_types", pa.list_(pa.string())),  # visible types, sorted
    ("mimic", pa.bool_()),  # a heterogeneous hematoma without a sharp margin is visible
    ("boxes", pa.list_(_BOX)),  # one per visible hemorrhage region, half-open pixel box
    ("expected_exclusion", pa.string()),  # null or one of EXCLUSIONS
    ("hu_sha256", pa.string()),  # sha256 of HU as little-endian int16, row-major
])

# Independent random streams: _rng(seed, STREAM, ...) never depends on the order of other draws.
_S_COHORT, _S_PATIENT, _S_STUDY, _S_READ, _S_RENDER, _S_BOX, _S_CALIB = range(7)
_KIND_WEIGHTS = {"IPH": 0.35, "SDH": 0.25, "SAH": 0.2, "EDH": 0.1, "IVH": 0.1}  # a scan's main hemorrhage
_SECOND_KIND_WEIGHTS = {"IVH": 0.35, "SAH": 0.3, "SDH": 0.15, "IPH": 0.1, "EDH": 0.1}  # mostly extensions
_SCANNERS = (("GE MEDICAL SYSTEMS", "LightSpeed VCT", "STANDARD"), ("SIEMENS", "SOMATOM Definition AS", "H30s"),
             ("Philips", "Brilliance 64", "UB"), ("TOSHIBA", "Aquilion ONE", "FC26"))
_FIRST = {"M": ("JAMES", "ROBERT", "DAVID", "WEI", "CARLOS", "AHMED", "PIOTR", "JOHN", "HIROSHI", "LUCAS"),
          "F": ("MARY", "LINDA", "SARAH", "MEI", "MARIA", "FATIMA", "ANNA", "EMMA", "YUKI", "SOFIA")}
_LAST = ("SMITH", "JOHNSON", "WANG", "GARCIA", "MUELLER", "NOWAK", "KIM", "SATO", "ROSSI", "MARTIN",
         "NGUYEN", "OKAFOR", "SILVA", "COHEN", "IVANOV", "PATEL")
_INSTITUTIONS = (("RIVERSIDE GENERAL HOSPITAL", "12 River Rd, Springfield"),
                 ("ST. ELSEWHERE MEDICAL CENTER", "400 Harbor Ave, Lakeside"),
                 ("NORTHGATE UNIVERSITY HOSPITAL", "1 Campus Dr, Northgate"))


# --- plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """One patient's head: an ellipsoid with skull, brain, CSF spaces (mm, radians)."""

    a_mm: float  # half width (left–right) of the outer skull at its widest level
    b_mm: float  # half length (anterior–posterior)
    cx_mm: float  # head centre offset from the image centre (column direction)
    cy_mm: float  # (row direction)
    tilt: float  # in-plane rotation
    skull_mm: float  # mean skull thickness
    phase: float  # phase of the skull's thickness / density bumps and of the sulcal pattern
    sulci: int  # sulci around the convexity
    ventricles: float  # ventricle size factor (atrophy → larger)
    brain_hu: float  # white matter density
    z0_t: float  # normalised height of the lowest slice
    table_mm: float  # patient z of the skull base (t = 0)
    defect: tuple[float, float] | None  # craniotomy (centre angle, half width), postoperative only


@dataclass(frozen=True)
class Lesion:
    """One hematoma spanning adjacent slices ``z[0] <= i < z[1]`` (z order)."""

    kind: str  # one of HEMORRHAGE_TYPES
    z: tuple[int, int]
    core: tuple[int, int] | None  # slices that show the blend sign; None: no blend sign
    mimic: bool  # heterogeneous without a sharp margin: truth stays normal_ich
    x: float  # IPH centre as a share of the head's half axes
    y: float
    angle: float  # position on the convexity (EDH, SDH, SAH); IVH side (<0 left, >0 right, 0 both)
    size_mm: float  # radius (IPH, SAH cluster) or maximal thickness (EDH, SDH)
    spread: float  # angular half width (EDH, SDH, rad); IVH: filled share of the ventricle
    hu: float  # density of the (hyper-attenuated part of the) blood
    hu_low: float  # hypo-attenuated part (blend) or far end of the gradient (mimic); else = hu
    cut: float  # direction of the hypo part / the gradient (rad)
    hypo_share: float  # share of the hematoma's pixels in the hypo part (blend core slices)
    shape: tuple[float, ...]  # IPH outline harmonics (amplitude, phase) for k = 2, 3, 4


@dataclass(frozen=True)
class SliceTruth:
    """Per-slice truth of one scan, z order; all arrays shape ``[n]``."""

    cls: np.ndarray  # int8 class index into CLASSES
    hardness: np.ndarray  # float ≥ 1: multiplies the readers' error rates
    mimic: np.ndarray  # bool


@dataclass(frozen=True)
class SeriesPlan:
    """One series of a study."""

    kind: str  # "localizer" | "axial" | "contrast" | "coronal"
    folder: str  # "se02"
    number: int  # SeriesNumber
    uid: str
    annotated: bool  # the readers labelled its slices (truth rows)
    storage: str  # "u12" (unsigned 12-bit, intercept −1024) | "s16" (signed 16-bit, intercept 0)
    spacing_mm: float
    ascending: bool  # acquisition order along z
    instance: tuple[int, ...]  # InstanceNumber of each image (image order: z order for axial series)
    extension: str  # ".dcm" or ""
    sop_uids: tuple[str, ...]
    rle: bool = False


@dataclass(frozen=True)
class Patient:
    index: int
    patient_id: str
    name: str  # DICOM PN "LAST^FIRST"
    sex: str
    birth_date: date
    visit_dates: tuple[date, ...]  # one per study, ascending
    institution: tuple[str, str]  # name, address
    head: Head  # anatomy (positioned per study)


@dataclass(frozen=True, eq=False)
class StudyPlan:
    index: int
    folder: str  # "st0007"
    patient: Patient
    visit: int  # index into patient.visit_dates
    uid: str
    frame_uid: str
    accession: str
    study_id: str
    time: str  # HHMMSS
    referring: str
    scanner: tuple[str, str, str]  # manufacturer, model, kernel
    exclusion: str | None  # one of EXCLUSIONS
    head: Head
    t: tuple[float, ...]  # normalised height of each axial slice (z order)
    lesions: tuple[Lesion, ...]
    truth: SliceTruth
    series: tuple[SeriesPlan, ...]
    readers: np.ndarray | None = None  # int8 [n_slices, n_readers] class index per reader (z order)

    @property
    def date(self) -> date:
        return self.patient.visit_dates[self.visit]

    @property
    def age_years(self) -> int:
        return _age(self.patient.birth_date, self.date)

    @property
    def postoperative(self) -> bool:
        return self.exclusion == "postoperative"

    @property
    def annotated_series(self) -> SeriesPlan:
        return next(s for s in self.series if s.annotated)


@dataclass(frozen=True)
class LesionRates:
    """Per-scan hemorrhage probabilities derived from ``class_ratio`` (:func:`lesion_rates`)."""

    p_ich: float  # a scan shows hemorrhage
    p_blend: float  # a hemorrhage scan has a blend-sign hematoma


@dataclass(frozen=True)
class ReaderModel:
    """Readers' slice-label error model, calibrated to the target Fleiss κ (:func:`calibrate_readers`)."""

    names: tuple[str, ...]
    skill: tuple[float, ...]  # error-rate multiplier per reader, mean 1, ∝ 1/years
    ich_rate: float  # base per-slice rate of non-ICH ↔ ICH confusion
    blend_rate: float  # base per-slice rate of normal ICH ↔ blend sign confusion


@dataclass(frozen=True, eq=False)
class Cohort:
    cfg: SynthConfig
    rates: LesionRates
    readers: ReaderModel
    patients: tuple[Patient, ...]
    studies: tuple[StudyPlan, ...]

    def usable(self) -> list[StudyPlan]:
        return [s for s in self.studies if s.exclusion is None]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _stochastic_round(x: float, rng: np.random.Generator) -> int:
    """``floor(x)`` or ``floor(x) + 1``, with expectation exactly ``x``."""
    lo = math.floor(x)
    return lo + int(rng.random() < x - lo)


def _round_outcomes(x: float) -> list[tuple[int, float]]:
    lo = math.floor(x)
    return [(lo, 1.0 - (x - lo)), (lo + 1, x - lo)]


def _span_lengths(cfg: SynthConfig, n: int) -> list[tuple[int, int, float]]:
    """All ``(k, b, probability)``: slices with blood ``k`` and blend-sign slices ``b`` of an n-slice scan."""
    out = []
    for k_raw, pk in _round_outcomes(cfg.ich_span_share * n):
        k = min(max(k_raw, 1), n)
        for b_raw, pb in _round_outcomes(cfg.blend_core_share * k):
            out.append((k, min(max(b_raw, 1), k), pk * pb))
    return out


def lesion_rates(cfg: SynthConfig) -> LesionRates:
    """Per-scan probabilities that make the expected slice fractions equal ``cfg.class_ratio``.

    Exact expectations over the scan length (uniform on ``slices_per_scan``) and the stochastic
    rounding of :func:`_plan_lesions`: fraction ICH = p_ich·E[k]/E[n], blend = p_ich·p_blend·E[b]/E[n].
    """
    lo, hi = cfg.slices_per_scan
    ns = range(lo, hi + 1)
    e_n = float(np.mean(ns))
    e_k = float(np.mean([sum(k * p for k, _, p in _span_lengths(cfg, n)) for n in ns]))
    e_b = float(np.mean([sum(b * p for _, b, p in _span_lengths(cfg, n)) for n in ns]))
    f = np.asarray(cfg.class_ratio, dtype=float) / sum(cfg.class_ratio)
    p_ich = (f[1] + f[2]) * e_n / e_k
    p_blend = f[2] * e_n / (p_ich * e_b) if p_ich > 0 else 0.0
    if not (0 <= p_ich <= 1 and 0 <= p_blend <= 1):
        raise ConfigError(f"class_ratio {cfg.class_ratio} is unreachable with ich_span_share="
                         f"{cfg.ich_span_share}, blend_core_share={cfg.blend_core_share}")
    return LesionRates(p_ich=float(p_ich), p_blend=float(p_blend))


def _profile(t: float) -> float:
    """Size of the head's axial cross-section at normalised height t relative to its widest (ellipsoid)."""
    return math.sqrt(max(0.1, 1.0 - ((t - 0.42) / 0.62) ** 2))


def _ventricle_size(t: float) -> float:
    """Lateral ventricles' size at height t, 0 (absent) … 1."""
    return max(0.0, 1.0 - ((t - 0.52) / 0.2) ** 2)


def _plan_anatomy(rng: np.random.Generator, *, child: bool, postop: bool) -> Head:
    """A patient's head; its position in the scanner is set per study (:func:`_position_head`)."""
    scale = 0.88 if child else rng.uniform(0.96, 1.02)
    return Head(
        a_mm=rng.uniform(64, 72) * scale, b_mm=rng.uniform(82, 90) * scale, cx_mm=0.0, cy_mm=0.0, tilt=0.0,
        skull_mm=rng.uniform(5.0, 7.0) * (0.7 if child else 1.0), phase=rng.uniform(0, 2 * np.pi),
        sulci=int(rng.integers(30, 42)), ventricles=rng.uniform(0.8, 1.5) * (0.8 if child else 1.0),
        brain_hu=rng.uniform(26, 30), z0_t=0.0, table_mm=0.0,
        defect=(rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.6)) if postop else None,
    )


def _position_head(rng: np.random.Generator, cfg: SynthConfig, head: Head, n: int) -> Head:
    """Where the head lies in this study: in-plane offset and tilt, table position, lowest slice's height."""
    span = (n - 1) * cfg.slice_thickness_mm / HEAD_HEIGHT_MM
    return replace(head, cx_mm=rng.uniform(-4, 4), cy_mm=rng.uniform(-4, 4), tilt=rng.uniform(-0.12, 0.12),
                   z0_t=rng.uniform(0.12, max(0.12, 0.88 - span)), table_mm=round(float(rng.uniform(-160, -60)), 1))


def _choose_kind(rng: np.random.Generator, feasible_ivh: bool, exclude: str = "",
                 weights: dict[str, float] = _KIND_WEIGHTS) -> str:
    kinds = [k for k in weights if k != exclude and (k != "IVH" or feasible_ivh)]
    w = np.array([weights[k] for k in kinds])
    return kinds[int(rng.choice(len(kinds), p=w / w.sum()))]


def _make_lesion(rng: np.random.Generator, kind: str, z: tuple[int, int], *,
                 core: tuple[int, int] | None = None, mimic: bool = False) -> Lesion:
    r, phi = rng.uniform(0.15, 0.5), rng.uniform(0, 2 * np.pi)
    size = {"IPH": rng.uniform(10, 22), "EDH": rng.uniform(8, 18), "SDH": rng.uniform(4, 11),
            "SAH": rng.uniform(20, 40), "IVH": 0.0}[kind]
    if core is not None:
        size = max(size, rng.uniform(14, 24))
    hu = rng.uniform(65, 85) if core is not None or mimic else rng.uniform(58, 82)
    hu = rng.uniform(55, 70) if kind in ("SAH", "IVH") else hu
    drop = rng.uniform(20, 35) if core is not None else rng.uniform(18, 30) if mimic else 0.0
    return Lesion(
        kind=kind, z=z, core=core, mimic=mimic, x=r * math.cos(phi), y=r * math.sin(phi),
        angle=rng.uniform(-np.pi, np.pi) if kind != "IVH" else float(rng.choice([-1.0, 0.0, 1.0])),
        size_mm=size,
        spread={"EDH": rng.uniform(0.3, 0.55), "SDH": rng.uniform(0.7, 1.2), "IVH": rng.uniform(0.25, 0.6)}
        .get(kind, 0.0),
        hu=hu, hu_low=hu - drop, cut=rng.uniform(0, 2 * np.pi), hypo_share=rng.uniform(0.25, 0.45),
        shape=tuple(float(v) for pair in zip(rng.uniform(0, 0.18, 3), rng.uniform(0, 2 * np.pi, 3), strict=True)
                    for v in pair),
    )


def _plan_lesions(rng: np.random.Generator, cfg: SynthConfig, t: Sequence[float], *,
                  ich: bool, blend: bool) -> tuple[Lesion, ...]:
    """Hematomas of one scan: a primary one over a run of ``k`` slices (all of them show blood), maybe a
    second type on part of that run. Blend scans: the primary is a blend hematoma whose ``b`` core slices
    show the sign (interior when possible: its edge slices look like plain normal ICH)."""
    if not ich:
        return ()
    n = len(t)
    k = min(max(_stochastic_round(cfg.ich_span_share * n, rng), 1), n)
    s0 = int(rng.integers(0, n - k + 1))

    vent = [i for i in range(s0, s0 + k) if _ventricle_size(t[i]) >= 0.2]  # IVH only where ventricles are

    def ivh_ok(a: int, b: int) -> bool:
        return all(a <= i < b for i in vent) and len(vent) == b - a

    if blend:
        b = min(max(_stochastic_round(cfg.blend_core_share * k, rng), 1), k)
        c0 = s0 + (int(rng.integers(1, k - b)) if b <= k - 2 else int(rng.integers(0, k - b + 1)))
        kind = "IPH" if rng.random() < 0.85 else "EDH"
        lesions = [_make_lesion(rng, kind, (s0, s0 + k), core=(c0, c0 + b))]
    else:
        kind = _choose_kind(rng, ivh_ok(s0, s0 + k))
        mimic = kind == "IPH" and rng.random() < cfg.mimic_share
        lesions = [_make_lesion(rng, kind, (s0, s0 + k), mimic=mimic)]
    if rng.random() < cfg.second_lesion_share:
        kind = _choose_kind(rng, bool(vent), lesions[0].kind, _SECOND_KIND_WEIGHTS)
        lo, hi = (vent[0], vent[-1] + 1) if kind == "IVH" else (s0, s0 + k)
        m = int(rng.integers(1, hi - lo + 1))
        a0 = lo + int(rng.integers(0, hi - lo - m + 1))
        lesions.append(_make_lesion(rng, kind, (a0, a0 + m)))
    return tuple(lesions)


def _envelope(lesion: Lesion, z: int) -> float:
    """Relative size of a hematoma on slice z: 1 mid-span, ≈0.5 on its edge slices."""
    z0, z1 = lesion.z
    return 0.45 + 0.55 * math.sin(math.pi * (z - z0 + 0.5) / (z1 - z0))


def slice_truth(lesions: Sequence[Lesion], t: Sequence[float]) -> SliceTruth:
    """True class, reading difficulty and mimic flag of each slice, shape ``[n]``.

    Difficulty (multiplies reader error rates): non-ICH slices next to blood or at the skull base;
    ICH slices where the blood is small (a hematoma's edge, SAH, IVH); blend slices at the core's edge.
    """
    n = len(t)
    cls = np.zeros(n, np.int8)
    mimic = np.zeros(n, bool)
    conspicuity = np.zeros(n)
    core_edge = np.zeros(n, bool)
    for les in lesions:
        z0, z1 = les.z
        cls[z0:z1] = np.maximum(cls[z0:z1], 1)
        mimic[z0:z1] |= les.mimic
        weight = {"SAH": 0.5, "IVH": 0.7}.get(les.kind, 1.0)
        for z in range(z0, z1):
            conspicuity[z] = max(conspicuity[z], weight * _envelope(les, z))
        if les.core:
            c0, c1 = les.core
            cls[c0:c1] = 2
            core_edge[[c0, c1 - 1]] = c1 - c0 > 1
    ich = cls > 0
    near = np.zeros(n, bool)
    near[1:] |= ich[:-1]
    near[:-1] |= ich[1:]
    base = np.array([1.0 + 0.5 * (ti < 0.22) for ti in t])
    hardness = np.where(ich, 1.0 + 1.5 * (1.0 - conspicuity), base + 0.8 * near) + 0.5 * core_edge
    return SliceTruth(cls=cls, hardness=hardness, mimic=mimic & (cls == 1))


# --- readers -------------------------------------------------------------------------------------------


def reader_confusion(model: ReaderModel, truth: SliceTruth) -> np.ndarray:
    """P(reader r calls class j | slice i), shape ``[n, readers, 3]``.

    Off-diagonal base rates: non-ICH→normal a (→blend a/20); normal→non-ICH a, →blend b (4b on a mimic);
    blend→normal 4b, →non-ICH a/10; scaled by slice difficulty and the reader's skill.
    """
    a, b, cls = model.ich_rate, model.blend_rate, truth.cls.astype(int)
    base = np.array([[0.0, a, 0.05 * a], [a, 0.0, b], [0.1 * a, 4.0 * b, 0.0]])
    off = base[cls]
    off[:, 2] *= np.where(truth.mimic, 4.0, 1.0)
    p = off[:, None, :] * truth.hardness[:, None, None] * np.asarray(model.skill)[None, :, None]
    p *= np.minimum(1.0, 0.9 / np.maximum(p.sum(-1, keepdims=True), 1e-12))
    p[np.arange(len(cls)), :, cls] = 1.0 - p.sum(-1)
    return p


def expected_kappas(model: ReaderModel, truth: SliceTruth, weights: np.ndarray | None = None) -> np.ndarray:
    """Expected category Fleiss κ (``labels.category_kappas`` of the readers' counts), shape ``[3]``.

    ``weights`` ``[n]``: how many slices each entry of ``truth`` stands for (default 1).
    """
    p = reader_confusion(model, truth)
    w = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=float)
    r, n = p.shape[1], w.sum()
    s = p.sum(1)  # [n, 3] expected raters per class
    disagreement = w @ (s * (r - s) - (p * (1 - p)).sum(1))  # E[x (r - x)] for independent readers
    p_j = w @ s / (n * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - disagreement / (n * r * (r - 1) * p_j * (1 - p_j))


def _bisect(f: Callable[[float], float], target: float, hi: float = 0.5) -> float:
    """x in [0, hi] with decreasing ``f(x) == target``."""
    lo = 0.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def _reference_truth(cfg: SynthConfig, rates: LesionRates, scans: int = 2000) -> tuple[SliceTruth, np.ndarray]:
    """Distinct slice truths of a large reference cohort and their counts: the same for every seed and
    cohort size, so the readers' error rates are a property of the config alone."""
    rng = _rng(0, _S_CALIB)
    n_ich = round(rates.p_ich * scans)  # exact counts, as in the cohort: a rare class needs no sampling noise
    n_blend = round(rates.p_blend * n_ich)
    parts = []
    for j in range(scans):
        n = int(rng.integers(cfg.slices_per_scan[0], cfg.slices_per_scan[1] + 1))
        z0_t = rng.uniform(0.12, max(0.12, 0.88 - (n - 1) * cfg.slice_thickness_mm / HEAD_HEIGHT_MM))
        t = [z0_t + i * cfg.slice_thickness_mm / HEAD_HEIGHT_MM for i in range(n)]
        parts.append(slice_truth(_plan_lesions(rng, cfg, t, ich=j < n_ich, blend=j < n_blend), t))
    rows = np.column_stack([np.concatenate([p.cls for p in parts]), np.concatenate([p.hardness for p in parts]),
                            np.concatenate([p.mimic for p in parts])])
    unique, counts = np.unique(rows, axis=0, return_counts=True)
    return SliceTruth(unique[:, 0].astype(np.int8), unique[:, 1], unique[:, 2] > 0), counts


def calibrate_readers(cfg: SynthConfig, rates: LesionRates) -> ReaderModel:
    """Solve the two base error rates so the expected κ (non-ICH, blend) equals ``cfg.reader_kappa``."""
    inv = 1.0 / np.asarray(cfg.reader_years, dtype=float)
    names = tuple(f"R{i + 1}" for i in range(len(inv)))
    model = ReaderModel(names, tuple(float(v) for v in inv / inv.mean()), 0.0, 0.0)
    truth, counts = _reference_truth(cfg, rates)
    k_non, k_blend = cfg.reader_kappa
    a = _bisect(lambda x: expected_kappas(replace(model, ich_rate=x), truth, counts)[0], k_non)
    model = replace(model, ich_rate=a)
    if (truth.cls == 2).any():
        model = replace(model, blend_rate=_bisect(
            lambda x: expected_kappas(replace(model, blend_rate=x), truth, counts)[2], k_blend))
    return model


def read_slices(rng: np.random.Generator, model: ReaderModel, truth: SliceTruth) -> np.ndarray:
    """Each reader's class index for each slice, int8 ``[n, readers]``."""
    cum = np.cumsum(reader_confusion(model, truth), axis=-1)
    u = rng.random(cum.shape[:2])
    return np.minimum((u[..., None] >= cum).sum(-1), 2).astype(np.int8)


# --- cohort ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    exclusion: str | None
    patient: int
    visit: int
    ich: bool
    blend: bool


def _cohort_specs(rng: np.random.Generator, cfg: SynthConfig, rates: LesionRates) -> list[_Spec]:
    """Who gets which study: stratified hemorrhage / blend counts for the usable scans (low variance,
    exact expectation), follow-up pairs, then the extra studies to be excluded; shuffled."""
    n = cfg.scans
    n_ich = min(_stochastic_round(rates.p_ich * n, rng), n)
    n_blend = min(_stochastic_round(rates.p_blend * n_ich, rng), n_ich)
    order = rng.permutation(n)
    ich, blend = set(order[:n_ich].tolist()), set(order[:n_blend].tolist())
    pairs = min(round(n * cfg.followup_share / (1 + cfg.followup_share)), n // 2)
    who = rng.permutation(n)
    patient_of, visit_of, p = {}, {}, 0
    for i in range(2 * pairs):
        patient_of[int(who[i])], visit_of[int(who[i])] = p + i // 2, i % 2
    p += pairs
    for i in range(2 * pairs, n):
        patient_of[int(who[i])], visit_of[int(who[i])], p = p, 0, p + 1
    specs = [_Spec(None, patient_of[i], visit_of[i], i in ich, i in blend) for i in range(n)]
    counts = (cfg.excluded_age, cfg.excluded_contrast_only, cfg.excluded_postoperative)
    for reason, count in zip(EXCLUSIONS, counts, strict=True):
        for _ in range(count):
            ich_x = bool(rng.random() < rates.p_ich)
            specs.append(_Spec(reason, p, 0, ich_x, ich_x and bool(rng.random() < rates.p_blend)))
            p += 1
    return [specs[i] for i in rng.permutation(len(specs))]


def _age(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _plan_patient(rng: np.random.Generator, index: int, visits: int, *, child: bool, postop: bool) -> Patient:
    sex = "F" if rng.random() < 0.5 else "M"
    first = date(2014, 1, 1) + timedelta(days=int(rng.integers(0, 3650)))
    dates = [first]
    for _ in range(visits - 1):
        dates.append(dates[-1] + timedelta(days=int(rng.integers(1, 45))))
    years = 5.0 if child else rng.uniform(18, 90)
    birth = first - timedelta(days=int(years * 365.25 + rng.integers(30, 330)))
    return Patient(
        index=index, patient_id=f"{int(rng.integers(10**7, 10**8))}",
        name=f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[sex][int(rng.integers(10))]}",
        sex=sex, birth_date=birth, visit_dates=tuple(dates),
        institution=_INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))],
        head=_plan_anatomy(rng, child=child, postop=postop),
    )


def _uid(cfg_key: str, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["blendsign-synth|" + cfg_key + "|" + "|".join(map(str, parts))]))


def _config_key(cfg: SynthConfig) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _plan_series(rng: np.random.Generator, cfg: SynthConfig, key: str, study: int, number: int, kind: str,
                 images: int, *, annotated: bool) -> SeriesPlan:
    axial = kind in ("axial", "contrast")
    ascending = not axial or rng.random() >= cfg.descending_share
    acquisition = list(range(images)) if ascending else list(range(images))[::-1]
    instance = [0] * images
    order = rng.permutation(images).tolist() if rng.random() < cfg.shuffled_share else acquisition
    for number_minus_1, image in enumerate(order):
        instance[image] = number_minus_1 + 1
    spacing_512 = rng.uniform(0.4, 0.5) * (2.0 if kind == "localizer" else 1.0)
    return SeriesPlan(
        kind=kind, folder=f"se{number:02d}", number=number, uid=_uid(key, "series", study, number),
        annotated=annotated, storage="u12" if rng.random() < cfg.unsigned_share else "s16",
        spacing_mm=round(spacing_512 * 512 / cfg.size, 6), ascending=bool(ascending), instance=tuple(instance),
        extension="" if rng.random() < cfg.no_extension_share else ".dcm",
        sop_uids=tuple(_uid(key, "image", study, number, i) for i in range(images)),
    )


def _plan_study(rng: np.random.Generator, cfg: SynthConfig, key: str, index: int, spec: _Spec,
                patient: Patient) -> StudyPlan:
    n = int(rng.integers(cfg.slices_per_scan[0], cfg.slices_per_scan[1] + 1))
    head = _position_head(rng, cfg, patient.head, n)
    t = tuple(head.z0_t + i * cfg.slice_thickness_mm / HEAD_HEIGHT_MM for i in range(n))
    lesions = _plan_lesions(rng, cfg, t, ich=spec.ich, blend=spec.blend)
    contrast_only = spec.exclusion == "no_noncontrast_axial_series"
    kinds: list[tuple[str, int, bool]] = [("localizer", int(rng.integers(1, 3)), False)]
    if not contrast_only:
        kinds.append(("axial", n, True))
    if contrast_only or rng.random() < cfg.contrast_share:
        kinds.append(("contrast", n, contrast_only))
    if not contrast_only and rng.random() < cfg.reformat_share:
        kinds.append(("coronal", 4, False))
    series = tuple(_plan_series(rng, cfg, key, index, i + 1, kind, images, annotated=annotated)
                   for i, (kind, images, annotated) in enumerate(kinds))
    return StudyPlan(
        index=index, folder=f"st{index:04d}", patient=patient, visit=spec.visit,
        uid=_uid(key, "study", index), frame_uid=_uid(key, "frame", index),
        accession=f"A{int(rng.integers(10**8, 10**9))}", study_id=f"{int(rng.integers(10**5, 10**6))}",
        time=f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        referring=f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST['F' if rng.random() < 0.5 else 'M'][0]}",
        scanner=_SCANNERS[int(rng.integers(len(_SCANNERS)))], exclusion=spec.exclusion, head=head, t=t,
        lesions=lesions, truth=slice_truth(lesions, t), series=series,
    )


def _assign_rle(rng: np.random.Generator, share: float, studies: list[StudyPlan]) -> list[StudyPlan]:
    """RLE-compress ``share`` of the annotated series (at least one) and of the other series."""
    chosen: set[tuple[int, int]] = set()
    for annotated in (True, False):
        pool = [(si, k) for si, s in enumerate(studies) for k, se in enumerate(s.series) if se.annotated == annotated]
        count = max(1, round(share * len(pool))) if annotated and share > 0 else round(share * len(pool))
        chosen |= {pool[i] for i in rng.permutation(len(pool))[:count]}
    return [replace(s, series=tuple(replace(se, rle=(si, k) in chosen) for k, se in enumerate(s.series)))
            for si, s in enumerate(studies)]


def plan_cohort(cfg: SynthConfig) -> Cohort:
    """Everything except pixels: patients, studies, series, hematomas, truth, readers' labels."""
    if cfg.seed < 0 or cfg.scans < 1 or cfg.size < 32:
        raise ConfigError("synth needs seed >= 0, scans >= 1 and size >= 32")
    rates = lesion_rates(cfg)
    readers = calibrate_readers(cfg, rates)
    key = _config_key(cfg)
    specs = _cohort_specs(_rng(cfg.seed, _S_COHORT), cfg, rates)
    visits = np.bincount([s.patient for s in specs])
    reason = {s.patient: s.exclusion for s in specs if s.exclusion}
    patients = tuple(_plan_patient(_rng(cfg.seed, _S_PATIENT, p), p, int(v), child=reason.get(p) == "age_lt_7",
                                   postop=reason.get(p) == "postoperative")
                     for p, v in enumerate(visits))
    studies = [_plan_study(_rng(cfg.seed, _S_STUDY, i), cfg, key, i, spec, patients[spec.patient])
               for i, spec in enumerate(specs)]
    studies = _assign_rle(_rng(cfg.seed, _S_COHORT, 1), cfg.rle_share, studies)
    studies = [replace(s, readers=read_slices(_rng(cfg.seed, _S_READ, s.index), readers, s.truth)) for s in studies]
    return Cohort(cfg=cfg, rates=rates, readers=readers, patients=patients, studies=tuple(studies))


# --- render ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Pixel grid of a slice: ``size × size`` pixels of ``spacing_mm``, centred on the scanner axis."""

    size: int
    spacing_mm: float

    def to_pixel(self, head: Head, x: float, y: float) -> tuple[int, int]:
        """(row, col) of head-frame point (x, y) mm, clipped into the image."""
        c, s = math.cos(head.tilt), math.sin(head.tilt)
        X, Y = x * c - y * s + head.cx_mm, x * s + y * c + head.cy_mm
        half = (self.size - 1) / 2
        col = min(max(round(X / self.spacing_mm + half), 0), self.size - 1)
        row = min(max(round(Y / self.spacing_mm + half), 0), self.size - 1)
        return row, col


@dataclass(frozen=True, eq=False)
class Region:
    """A hemorrhage's visible pixels on one slice."""

    kind: str
    mask: np.ndarray  # bool [size, size]
    hypo: np.ndarray | None  # bool [size, size]: hypo-attenuated part (blend-sign core slices)
    mimic: bool

    def box(self) -> tuple[int, int, int, int]:
        """Half-open (x_min, y_min, x_max, y_max)."""
        rows, cols = np.flatnonzero(self.mask.any(1)), np.flatnonzero(self.mask.any(0))
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@dataclass(frozen=True, eq=False)
class RenderedSlice:
    hu: np.ndarray  # int16 [size, size]: exactly the HU that is stored
    regions: tuple[Region, ...]


@dataclass(frozen=True, eq=False)
class _Frame:
    """Head-frame geometry of one axial slice; arrays ``[size, size]``."""

    hg: HeadGrid
    x: np.ndarray  # mm, left–right
    y: np.ndarray  # mm, anterior (−) – posterior (+)
    rho: np.ndarray  # normalised radius, 1 at the outer skull
    phi: np.ndarray  # elliptic angle
    depth: np.ndarray  # mm inside the inner table (> 0: intracranial)
    a: float  # outer skull half axes at this height
    b: float
    csf: np.ndarray  # bool: subarachnoid spaces (rim, sulci, fissure)
    ventricles: tuple[np.ndarray, np.ndarray]  # bool: left, right lateral ventricle
    vent_centre: tuple[tuple[float, float], tuple[float, float]]

    @property
    def r(self) -> float:
        return 0.5 * (self.a + self.b)

    @property
    def intracranial(self) -> np.ndarray:
        return self.depth > 0


def _coords(head: Head, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(grid.size, dtype=np.float32) - (grid.size - 1) / 2) * np.float32(grid.spacing_mm)
    X, Y = c[None, :] - np.float32(head.cx_mm), c[:, None] - np.float32(head.cy_mm)
    ct, st = np.float32(math.cos(head.tilt)), np.float32(math.sin(head.tilt))
    return X * ct + Y * st, Y * ct - X * st


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, rot: float) -> np.ndarray:
    c, s = math.cos(rot), math.sin(rot)
    u, v = (x - cx) * c + (y - cy) * s, (y - cy) * c - (x - cx) * s
    return (u / ax) ** 2 + (v / ay) ** 2 < 1.0


def _ellipse_in(hg: HeadGrid, cx: float, cy: float, ax: float, ay: float, rot: float) -> np.ndarray:
    """:func:`_ellipse` on a head grid, computed only in the window around it, bool ``[size, size]``."""
    row, col = hg.grid.to_pixel(hg.head, cx, cy)
    reach = math.ceil(max(ax, ay) / hg.grid.spacing_mm) + 2
    win = (slice(max(row - reach, 0), row + reach + 1), slice(max(col - reach, 0), col + reach + 1))
    out = np.zeros(hg.x.shape, bool)
    out[win] = _ellipse(hg.x[win], hg.y[win], cx, cy, ax, ay, rot)
    return out


def _angdiff(a: np.ndarray | float, b: float) -> np.ndarray:
    return (np.asarray(a) - b + np.pi) % (2 * np.pi) - np.pi


@dataclass(frozen=True, eq=False)
class HeadGrid:
    """A head on a series' pixel grid: the geometry shared by all its axial slices, ``[size, size]``."""

    head: Head
    grid: Grid
    x: np.ndarray  # head-frame mm, left–right
    y: np.ndarray  # head-frame mm, anterior (−) – posterior (+)
    rho: np.ndarray  # normalised radius at the head's widest level (divide by _profile(t))
    phi: np.ndarray  # elliptic angle (the same at every height)
    thick: np.ndarray  # skull thickness at phi, mm: thin temporal, thick frontal / occipital
    harmonics: dict[int, tuple[np.ndarray, np.ndarray]]  # k → (sin kφ, cos kφ) for k = 1, 2, 3, 5

    def wave(self, k: int, shift: float) -> np.ndarray:
        """``sin(k φ + shift)`` from the stored harmonics (no transcendental per pixel)."""
        sin_k, cos_k = self.harmonics[k]
        return sin_k * np.float32(math.cos(shift)) + cos_k * np.float32(math.sin(shift))

    def sector(self, centre: float, half_width: float) -> np.ndarray:
        """bool: φ within ``half_width`` (< π) of ``centre``."""
        return self.wave(1, math.pi / 2 - centre) > np.float32(math.cos(half_width))


def head_grid(head: Head, grid: Grid) -> HeadGrid:
    x, y = _coords(head, grid)
    xn, yn = x / np.float32(head.a_mm), y / np.float32(head.b_mm)
    phi = np.arctan2(yn, xn)
    thick = head.skull_mm * (0.7 + 0.5 * np.sin(phi) ** 2 + 0.1 * np.sin(3 * phi + head.phase))
    harmonics = {k: (np.sin(k * phi), np.cos(k * phi)) for k in (1, 2, 3, 5)}
    return HeadGrid(head=head, grid=grid, x=x, y=y, rho=np.hypot(xn, yn), phi=phi, thick=thick,
                    harmonics=harmonics)


def _frame(hg: HeadGrid, t: float) -> _Frame:
    head, x, y, phi, p = hg.head, hg.x, hg.y, hg.phi, _profile(t)
    a, b = head.a_mm * p, head.b_mm * p
    r = 0.5 * (a + b)
    rho = hg.rho / np.float32(p)
    depth = (1.0 - hg.thick / r - rho) * r
    inside = depth > 0
    # Sulci: radial clefts that bend inwards, of irregular spacing, width and depth (varying with t).
    wobble = (0.6 * hg.wave(3, 7 * t + head.phase) + 0.4 * hg.wave(5, -4 * t)
              + 0.05 * depth * hg.wave(2, 9 * t + head.phase))
    arg = head.sulci / 2 * phi + 2 * wobble
    turns = np.floor(arg / np.float32(np.pi))
    index = turns.astype(np.int32)  # which sulcus
    ks = np.arange(index.min(), index.max() + 1)
    width = (0.4 + 0.5 * np.sin(1.7 * ks + 3 * t) ** 2).astype(np.float32)[index - ks[0]]  # per sulcus
    max_depth = (3 + 14 * np.sin(2.3 * ks + head.phase + 2 * t) ** 2).astype(np.float32)[index - ks[0]]
    half_width = (head.sulci / 2) * width / (r * np.maximum(rho, 0.2))
    sulci = (np.abs(np.sin(arg - turns * np.float32(np.pi))) < half_width) & (depth < max_depth)
    fissure = (np.abs(x) < 1.0) & (np.abs(y) > 0.3 * b) & (depth < 35)
    csf = inside & ((depth < 0.9) | sulci | fissure)
    v, vs = _ventricle_size(t), head.ventricles
    centres = tuple((side * (4 + 3 * v) * vs, -6 + 25 * (t - 0.52)) for side in (-1.0, 1.0))
    vents = tuple(
        _ellipse_in(hg, cx, cy, (2 + 5 * v) * vs, (9 + 18 * v) * vs, side * (0.3 - 0.6 * (t - 0.32))) & inside
        if v > 0 else np.zeros_like(inside)
        for (cx, cy), side in zip(centres, (-1.0, 1.0), strict=True))
    return _Frame(hg=hg, x=x, y=y, rho=rho, phi=phi, depth=depth, a=a, b=b, csf=csf,
                  ventricles=(vents[0], vents[1]), vent_centre=(centres[0], centres[1]))


def tissue_masks(hg: HeadGrid, t: float) -> dict[str, np.ndarray]:
    """Where each tissue of the anatomy lies on an axial slice at height t (before hemorrhages), bool
    ``[size, size]``: "air", "scalp", "bone", "brain" (parenchyma), "csf" (subarachnoid), "ventricles"."""
    f = _frame(hg, t)
    vent = f.ventricles[0] | f.ventricles[1]
    scalp_edge = 1 + SCALP_MM / f.r
    return {"air": f.rho >= scalp_edge, "scalp": (f.rho >= 1) & (f.rho < scalp_edge),
            "bone": (f.rho < 1) & ~f.intracranial, "brain": f.intracranial & ~f.csf & ~vent,
            "csf": f.csf & ~vent, "ventricles": vent}


def _smooth_field(rng: np.random.Generator, size: int, knots: int = 10) -> np.ndarray:
    """Smooth random texture, ≈unit SD, ``[size, size]`` float32: a Gaussian-kernel upsampled grid."""
    u = np.linspace(0, knots - 1, size)[:, None] - np.arange(knots)[None, :]
    w = np.exp(-0.5 * (u / 0.9) ** 2)
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    coarse = rng.standard_normal((knots, knots)).astype(np.float32)
    # einsum without BLAS: a multithreaded BLAS spins on this tiny product and wastes the other cores
    field = np.einsum("ik,kj->ij", w, np.einsum("kl,jl->kj", coarse, w))
    return field / np.float32(max(float(field.std()), 1e-6))


def _tissue(head: Head, t: float, f: _Frame, tex: np.ndarray, *, contrast: bool) -> np.ndarray:
    """Noise-free HU of the anatomy (air, scalp, skull, brain, CSF, ventricles), float32 ``[size, size]``."""
    inside = f.intracranial
    bone = (f.rho < 1) & ~inside
    scalp = (f.rho >= 1) & (f.rho < 1 + SCALP_MM / f.r)
    u = np.clip((1 - f.rho) / np.maximum(1e-3, 1 - f.rho - f.depth / f.r), 0, 1)  # 0 outer … 1 inner table
    bone_hu = 800 + 600 * (2 * u - 1) ** 2 + 80 * f.hg.wave(5, head.phase)
    brain_hu = head.brain_hu + 9 * np.clip(1 - f.depth / 3.5, 0, 1) + 2.5 * tex
    hu = np.where(inside, brain_hu, np.where(bone, bone_hu, np.where(scalp, 30 + 4 * tex, -1000.0)))
    vent = f.ventricles[0] | f.ventricles[1]
    hu = np.where(f.csf | vent, 7 + 2 * tex, hu)
    if 0.3 <= t <= 0.48:  # third ventricle
        hu = np.where(inside & (np.abs(f.x) < 1.5 * head.ventricles) & (np.abs(f.y + 2) < 9), 7 + 2 * tex, hu)
    if t < 0.3:  # fourth ventricle
        hu = np.where(_ellipse_in(f.hg, 0, 0.35 * f.b, 5, 3.5, 0) & inside, 7 + 2 * tex, hu)
    if t < 0.22:  # petrous ridges: from the lateral skull base, pointing antero-medially
        w = 2 + 4 * (1 - t / 0.22)
        for side in (-1, 1):
            hu = np.where(_ellipse_in(f.hg, side * 0.6 * f.a, 0.15 * f.b, 0.35 * f.a, w, -side * 0.6) & inside,
                          1100 + 100 * tex, hu)
    if head.defect is not None:  # craniotomy: bone flap missing, a little air under it
        hu = np.where(bone & f.hg.sector(*head.defect), 25 + 4 * tex, hu)
        air = inside & (f.depth < 3) & f.hg.sector(head.defect[0], 0.6 * head.defect[1]) & (f.y < 0)
        hu = np.where(air, -750.0, hu)
    if contrast:  # dural / sinus enhancement, vessels, choroid plexus
        hu = np.where(inside, hu + 3, hu)
        hu = np.where(inside & (f.depth < 1.0), 70 + 5 * tex, hu)
        hu = np.where(inside & (np.abs(f.x) < 4) & (f.y > 0.7 * f.b) & (f.depth < 5), 150.0, hu)
        for vmask in f.ventricles:  # choroid plexus: the posterior tip (glomus) of each lateral ventricle
            if vmask.sum() > 4:
                hu = np.where(vmask & (f.y >= np.quantile(f.y[vmask], 0.92)), 45.0, hu)
        if t < 0.4:
            for k in range(6):
                ang = k * np.pi / 3 + head.phase
                hu = np.where((f.x - 14 * math.cos(ang)) ** 2 + (f.y + 8 - 14 * math.sin(ang)) ** 2 < 2.25, 220.0, hu)
    return hu.astype(np.float32)


def _nominal_point(lesion: Lesion, head: Head, f: _Frame) -> tuple[float, float]:
    """A head-frame point (mm) certainly inside the hemorrhage's site."""
    if lesion.kind == "IPH":
        return lesion.x * f.a, lesion.y * f.b
    if lesion.kind == "IVH":
        return f.vent_centre[int(lesion.angle > 0)]
    rho = 1 - (head.skull_mm + 1.5) / f.r
    return rho * f.a * math.cos(lesion.angle), rho * f.b * math.sin(lesion.angle)


def _lesion_mask(lesion: Lesion, z: int, head: Head, f: _Frame, grid: Grid) -> np.ndarray:
    """Pixels of one hematoma on slice z, bool ``[size, size]``, never empty."""
    e, size = _envelope(lesion, z), lesion.size_mm * _envelope(lesion, z)
    if lesion.kind == "IPH":  # computed in a window around the centre
        h, (row, col) = lesion.shape, grid.to_pixel(head, lesion.x * f.a, lesion.y * f.b)
        reach = math.ceil(size * (1 + h[0] + h[2] + h[4]) / grid.spacing_mm) + 2
        win = (slice(max(row - reach, 0), row + reach + 1), slice(max(col - reach, 0), col + reach + 1))
        dx, dy = f.x[win] - lesion.x * f.a, f.y[win] - lesion.y * f.b
        theta = np.arctan2(dy, dx)
        radius = size * (1 + h[0] * np.cos(2 * theta + h[1]) + h[2] * np.cos(3 * theta + h[3])
                         + h[4] * np.cos(4 * theta + h[5]))
        mask = np.zeros(f.x.shape, bool)
        mask[win] = (dx * dx + dy * dy < radius**2) & f.intracranial[win]
    elif lesion.kind in ("EDH", "SDH"):
        p = np.clip(1 - (_angdiff(f.phi, lesion.angle) / lesion.spread) ** 2, 0, None)
        shape = np.sqrt(p) if lesion.kind == "EDH" else p**0.3  # biconvex lens / crescent
        mask = f.intracranial & (p > 0) & (f.depth < size * shape)
    elif lesion.kind == "SAH":
        px, py = _nominal_point(lesion, head, f)
        mask = f.csf & ((f.x - px) ** 2 + (f.y - py) ** 2 < size**2)
    else:  # IVH: the dependent (posterior) part of one or both lateral ventricles
        sides = [f.ventricles[0], f.ventricles[1]] if lesion.angle == 0 else [f.ventricles[int(lesion.angle > 0)]]
        vent = sides[0] | sides[-1]
        mask = np.zeros_like(vent)
        if vent.any():
            mask = vent & (f.y >= np.quantile(f.y[vent], 1 - lesion.spread * e))
    if not mask.any():
        mask = mask.copy()
        mask[grid.to_pixel(head, *_nominal_point(lesion, head, f))] = True
    return mask


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _blood(lesion: Lesion, z: int, mask: np.ndarray, f: _Frame) -> tuple[np.ndarray, np.ndarray | None]:
    """HU of the blood at the mask's pixels ``[m]`` and, on blend core slices, the hypo part's pixels.

    Blend sign: hyper part ``hu`` and hypo part ``hu_low`` (≥ 20 HU lower) split by a sharp, gently
    curved margin. Mimic: the same drop spread as a smooth gradient over the whole hematoma.
    """
    in_core = lesion.core is not None and lesion.core[0] <= z < lesion.core[1]
    if not (in_core or lesion.mimic):
        return np.full(int(mask.sum()), lesion.hu, np.float32), None
    px, py = f.x[mask], f.y[mask]
    dx, dy = px - px.mean(), py - py.mean()
    along = dx * math.cos(lesion.cut) + dy * math.sin(lesion.cut)
    across = dy * math.cos(lesion.cut) - dx * math.sin(lesion.cut)
    if lesion.mimic:
        s = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        return (lesion.hu + (lesion.hu_low - lesion.hu) * s).astype(np.float32), None
    s = along + across**2 / (2.5 * lesion.size_mm)
    n_hypo = min(max(round(lesion.hypo_share * len(s)), 1), len(s) - 1)
    hypo_idx = np.argsort(s, kind="stable")[len(s) - n_hypo:]
    values = np.full(len(s), lesion.hu, np.float32)
    values[hypo_idx] = lesion.hu_low
    hypo = np.zeros_like(mask)
    hypo[tuple(ix[hypo_idx] for ix in np.nonzero(mask))] = True
    return values, hypo


_DRAW_ORDER = {"IVH": 0, "SAH": 1, "SDH": 2, "EDH": 3, "IPH": 4}


def render_axial(hg: HeadGrid, t: float, z: int, lesions: Sequence[Lesion], rng: np.random.Generator,
                 *, noise_hu: float, hu_range: tuple[int, int], contrast: bool = False) -> RenderedSlice:
    """Axial slice ``z`` (height ``t``) in HU, int16 ``[size, size]``, clipped to ``hu_range``.

    Hematomas on the slice are drawn over the anatomy (blend-sign hematomas last); a region's mask is
    what remains visible of it.
    """
    head, grid = hg.head, hg.grid
    f = _frame(hg, t)
    tex = _smooth_field(rng, grid.size)
    hu = _tissue(head, t, f, tex, contrast=contrast)
    on_slice = sorted((les for les in lesions if les.z[0] <= z < les.z[1]),
                      key=lambda les: (les.core is not None, _DRAW_ORDER[les.kind]))
    drawn: list[tuple[Lesion, np.ndarray, np.ndarray | None]] = []
    for les in on_slice:
        mask = _lesion_mask(les, z, head, f, grid)
        while les.core is not None and les.core[0] <= z < les.core[1] and mask.sum() < 6:
            mask = _dilate(mask) & (f.intracranial | mask)
        values, hypo = _blood(les, z, mask, f)
        hu[mask] = values + 1.5 * tex[mask]
        drawn.append((les, mask, hypo))
    air = f.rho >= 1 + SCALP_MM / f.r
    sigma = np.where(air, np.float32(12.0), np.float32(noise_hu))
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * sigma
    out = np.clip(np.rint(hu), *hu_range).astype(np.int16)
    regions, covered = [], np.zeros(out.shape, bool)
    for les, mask, hypo in reversed(drawn):
        visible = mask & ~covered
        covered |= mask
        if visible.any():
            regions.append(Region(les.kind, visible, hypo, les.mimic))
    return RenderedSlice(hu=out, regions=tuple(reversed(regions)))


def _render_coronal(head: Head, y0: float, grid: Grid, rng: np.random.Generator, noise_hu: float,
                    hu_range: tuple[int, int]) -> np.ndarray:
    """A coronal reformat through head-frame y = ``y0`` mm (rows: superior → inferior), int16."""
    c = (np.arange(grid.size, dtype=np.float32) - (grid.size - 1) / 2) * np.float32(grid.spacing_mm)
    x, h = c[None, :] - np.float32(head.cx_mm), -c[:, None]  # h: mm above the ellipsoid's centre
    s = math.sqrt(max(0.05, 1 - (y0 / head.b_mm) ** 2))
    a, v = head.a_mm * s, 0.62 * HEAD_HEIGHT_MM * s
    rho, t = np.hypot(x / a, h / v), 0.42 + h / HEAD_HEIGHT_MM
    inner = 1 - head.skull_mm / (0.5 * (a + v))
    tex = _smooth_field(rng, grid.size)
    hu = np.where(rho < inner, head.brain_hu + 2.5 * tex, np.where(rho < 1, 1100 + 200 * tex,
                  np.where(rho < 1 + SCALP_MM / a, 30 + 4 * tex, -1000.0)))
    hu = np.where((rho < 1) & (t < 0.04), np.where(t >= 0, 1100 + 200 * tex, 40 + 4 * tex), hu)  # skull base
    hu = np.where((t < -0.1) & (np.abs(x) < 0.45 * head.a_mm), 40 + 4 * tex, hu)  # neck
    if abs(y0) < 25 * head.ventricles:
        for side in (-1, 1):
            hu = np.where(_ellipse(x, h, side * 7 * head.ventricles, 0.15 * v, 3 * head.ventricles, 12, side * 0.3),
                          7 + 2 * tex, hu)
    hu = hu + rng.standard_normal(hu.shape, dtype=np.float32) * noise_hu
    return np.clip(np.rint(hu), *hu_range).astype(np.int16)


def _render_localizer(head: Head, lateral: bool, grid: Grid, rng: np.random.Generator,
                      hu_range: tuple[int, int]) -> np.ndarray:
    """A scout projection (lateral or AP) of head and neck, int16 (pseudo-HU)."""
    c = (np.arange(grid.size, dtype=np.float32) - (grid.size - 1) / 2) * np.float32(grid.spacing_mm)
    w, h = c[None, :], -c[:, None] + 40
    half = head.b_mm if lateral else head.a_mm
    rho = np.hypot(w / half, h / (0.62 * HEAD_HEIGHT_MM))
    path = np.sqrt(np.clip(1 - rho**2, 0, None))
    neck = (h < -0.5 * HEAD_HEIGHT_MM) & (np.abs(w) < 0.45 * half)
    hu = -1000 + 1400 * path + 900 * ((rho > 0.93) & (rho < 1)) + 600 * neck
    hu = hu + rng.standard_normal(hu.shape, dtype=np.float32) * 8
    return np.clip(np.rint(hu), *hu_range).astype(np.int16)


# --- write -------------------------------------------------------------------------------------------------


_STORAGE = {  # HU range, intercept, PixelRepresentation, BitsStored, numpy dtype
    "u12": ((-1024, 3071), -1024, 0, 12, np.uint16),
    "s16": ((-32768, 32767), 0, 1, 16, np.int16),
}


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _series_dataset(study: StudyPlan, series: SeriesPlan, grid: Grid) -> Dataset:
    """The elements shared by every image of a series (see :func:`_set_image` for the rest)."""
    patient, cfg_storage = study.patient, _STORAGE[series.storage]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID("")
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = "BLENDSIGN_SYN1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    contrast = series.kind == "contrast"
    ds.ImageType = {"localizer": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "coronal": ["DERIVED", "SECONDARY",
                    "REFORMATTED"]}.get(series.kind, ["ORIGINAL", "PRIMARY", "AXIAL"])
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _da(study.date)
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.time
    ds.AccessionNumber, ds.Modality, ds.Manufacturer = study.accession, "CT", study.scanner[0]
    ds.InstitutionName, ds.InstitutionAddress = patient.institution
    ds.ReferringPhysicianName = study.referring
    ds.StudyDescription = "CT HEAD W CONTRAST" if study.exclusion == "no_noncontrast_axial_series" \
        else "CT HEAD WO CONTRAST"
    ds.SeriesDescription = {"localizer": "Topogram", "axial": "HEAD 5mm", "contrast": "HEAD C+ 5mm",
                            "coronal": "COR MPR 3mm"}[series.kind]
    ds.ManufacturerModelName = study.scanner[1]
    ds.PatientName, ds.PatientID = patient.name, patient.patient_id
    ds.PatientBirthDate, ds.PatientSex = _da(patient.birth_date), patient.sex
    ds.PatientAge = f"{study.age_years:03d}Y"
    if contrast:
        ds.ContrastBolusAgent = "IOHEXOL 350 MG/ML"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = {"axial": "5", "contrast": "5", "coronal": "3"}.get(series.kind, "")
    ds.KVP, ds.ConvolutionKernel, ds.PatientPosition = "120", study.scanner[2], "HFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, series.uid
    ds.StudyID, ds.SeriesNumber = study.study_id, series.number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study.frame_uid, ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = grid.size
    ds.PixelSpacing = [str(series.spacing_mm)] * 2
    ds.BitsAllocated, ds.BitsStored = 16, cfg_storage[3]
    ds.HighBit, ds.PixelRepresentation = cfg_storage[3] - 1, cfg_storage[2]
    ds.WindowCenter, ds.WindowWidth = "40", "80"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(cfg_storage[1]), "1", "HU"
    return ds


def _set_image(ds: Dataset, series: SeriesPlan, image: int, position: tuple[float, float, float],
               orientation: Sequence[int]) -> Dataset:
    """Set the per-image elements of a series dataset (in place) and reset it to uncompressed."""
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID(series.sop_uids[image])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "PixelData" in ds:
        del ds.PixelData
    ds.InstanceNumber = series.instance[image]
    ds.ImagePositionPatient = [f"{v:.2f}" for v in position]
    ds.ImageOrientationPatient = [str(v) for v in orientation]
    if series.kind in ("axial", "contrast"):
        ds.SliceLocation = f"{position[2]:.2f}"
    return ds


def _encode(ds: Dataset, hu: np.ndarray, series: SeriesPlan) -> bytes:
    """DICOM bytes of ``ds`` with pixel data ``hu`` (int16 HU, already within the storage's range)."""
    _, intercept, _, _, dtype = _STORAGE[series.storage]
    stored = (hu.astype(np.int32) - intercept).astype(dtype)
    if series.rle:
        ds.compress(RLELossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    if series.rle and not np.array_equal(pydicom.dcmread(io.BytesIO(data)).pixel_array, stored):
        raise RuntimeError(f"RLE round trip changed the pixels of {series.sop_uids}")
    return data


def hu_sha256(hu: np.ndarray) -> str:
    """sha256 hex of HU as little-endian int16, row-major (how truth identifies a slice's pixels)."""
    return hashlib.sha256(np.ascontiguousarray(hu, dtype="<i2").tobytes()).hexdigest()


def _images(study: StudyPlan, series: SeriesPlan, cfg: SynthConfig
            ) -> Iterator[tuple[int, np.ndarray, RenderedSlice | None, tuple[float, float, float], tuple[int, ...]]]:
    """(image index, HU, rendered axial slice or None, ImagePositionPatient, orientation) per image."""
    head, grid = study.head, Grid(cfg.size, series.spacing_mm)
    hu_range = _STORAGE[series.storage][0]
    hg = head_grid(head, grid) if series.kind in ("axial", "contrast") else None
    corner = -(cfg.size - 1) / 2 * series.spacing_mm
    for i in range(len(series.sop_uids)):
        rng = _rng(cfg.seed, _S_RENDER, study.index, series.number, i)
        if series.kind in ("axial", "contrast"):
            assert hg is not None
            r = render_axial(hg, study.t[i], i, study.lesions, rng, noise_hu=cfg.noise_hu,
                             hu_range=hu_range, contrast=series.kind == "contrast")
            z = head.table_mm + study.t[i] * HEAD_HEIGHT_MM
            yield i, r.hu, r, (corner, corner, z), (1, 0, 0, 0, 1, 0)
        elif series.kind == "coronal":
            y0 = -30.0 + 20.0 * i
            top = head.table_mm + 0.42 * HEAD_HEIGHT_MM - corner
            hu = _render_coronal(head, y0, grid, rng, cfg.noise_hu, hu_range)
            yield i, hu, None, (corner, y0 + head.cy_mm, top), (1, 0, 0, 0, 0, -1)
        else:
            lateral = i == 0
            hu = _render_localizer(head, lateral, grid, rng, hu_range)
            top = head.table_mm + 0.42 * HEAD_HEIGHT_MM + 40 - corner
            orient = (0, 1, 0, 0, 0, -1) if lateral else (1, 0, 0, 0, 0, -1)
            yield i, hu, None, (0.0 if lateral else corner, corner if lateral else 0.0, top), orient


def _reader_boxes(rng: np.random.Generator, cfg: SynthConfig, skill: float, label: int,
                  truth_boxes: Sequence[tuple[tuple[int, int, int, int], float]],
                  false_box: tuple[int, int, int, int]) -> list[tuple[int, int, int, int] | None]:
    """One reader's boxes on a slice: none for non-ICH; else each visible region (small ones sometimes
    missed, at least one kept) with edge jitter ∝ box size; a false-positive call boxes ``false_box``."""
    if label == 0:
        return [None]
    if not truth_boxes:
        truth_boxes = [(false_box, 0.0)]
    miss = rng.random(len(truth_boxes)) < np.minimum(
        0.8, 0.5 * skill * np.exp(-np.array([a for _, a in truth_boxes]) / cfg.reader_miss_area_mm2))
    miss[int(np.argmax([a for _, a in truth_boxes]))] = False
    out: list[tuple[int, int, int, int] | None] = []
    for (box, _), missed in zip(truth_boxes, miss, strict=True):
        jitter = rng.standard_normal(4) * cfg.reader_box_jitter * skill
        if missed:
            continue
        w, h = box[2] - box[0], box[3] - box[1]
        x0, y0, x1, y1 = (round(v + j * s) for v, j, s in zip(box, jitter, (w, h, w, h), strict=True))
        x0, y0 = min(max(x0, 0), cfg.size - 1), min(max(y0, 0), cfg.size - 1)
        out.append((x0, y0, min(max(x1, x0 + 1), cfg.size), min(max(y1, y0 + 1), cfg.size)))
    return out


def _false_box(rng: np.random.Generator, study: StudyPlan, z: int, grid: Grid) -> tuple[int, int, int, int]:
    """A plausible box for a false-positive ICH call: 6–20 mm somewhere inside the skull."""
    p, r, side = _profile(study.t[z]), rng.uniform(0.2, 0.75), rng.uniform(6, 20)
    ang = rng.uniform(0, 2 * np.pi)
    row, col = grid.to_pixel(study.head, r * study.head.a_mm * p * math.cos(ang),
                             r * study.head.b_mm * p * math.sin(ang))
    half = max(1, round(side / grid.spacing_mm / 2))
    x0, y0 = max(col - half, 0), max(row - half, 0)
    return x0, y0, min(col + half, grid.size), min(row + half, grid.size)


def _write_study(out: Path, study: StudyPlan, cohort: Cohort) -> tuple[list[str], list[dict], list[list]]:
    """Render and write one study; its file paths, truth rows and annotation rows."""
    cfg, files, truth_rows, ann_rows = cohort.cfg, [], [], []
    for series in study.series:
        grid = Grid(cfg.size, series.spacing_mm)
        ds = _series_dataset(study, series, grid)
        for i, hu, rendered, position, orientation in _images(study, series, cfg):
            rel = f"dicom/{study.folder}/{series.folder}/im{series.instance[i]:04d}{series.extension}"
            write_bytes_atomic(out / rel, _encode(_set_image(ds, series, i, position, orientation), hu, series))
            files.append(rel)
            if series.annotated and rendered is not None:
                boxes = [r.box() for r in rendered.regions]
                truth_rows.append({
                    "study_instance_uid": study.uid, "series_instance_uid": series.uid,
                    "sop_instance_uid": series.sop_uids[i], "patient_id": study.patient.patient_id,
                    "file": rel, "instance_number": series.instance[i], "z_index": i,
                    "label": CLASSES[int(study.truth.cls[i])],
                    "hemorrhage_types": sorted({r.kind for r in rendered.regions}),
                    "mimic": any(r.mimic for r in rendered.regions),
                    "boxes": [dict(zip(("x_min", "y_min", "x_max", "y_max"), b, strict=True)) for b in boxes],
                    "expected_exclusion": study.exclusion, "hu_sha256": hu_sha256(hu),
                })
                ann_rows += _annotate(study, series, i, rendered, grid, cohort)
    return files, truth_rows, ann_rows


def _annotate(study: StudyPlan, series: SeriesPlan, z: int, rendered: RenderedSlice, grid: Grid,
              cohort: Cohort) -> list[list]:
    """annotations.csv rows of one slice: every reader, one row per box (or one empty-box row)."""
    assert study.readers is not None
    rng = _rng(cohort.cfg.seed, _S_BOX, study.index, z)
    area = grid.spacing_mm**2
    truth_boxes = [(r.box(), float(r.mask.sum()) * area) for r in rendered.regions]
    false_box = _false_box(rng, study, z, grid)
    rows = []
    for r, name in enumerate(cohort.readers.names):
        label = int(study.readers[z, r])
        for box in _reader_boxes(rng, cohort.cfg, cohort.readers.skill[r], label, truth_boxes, false_box):
            rows.append([study.uid, series.sop_uids[z], name, CLASSES[label], *(box or ("", "", "", ""))])
    return rows


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[object]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _parquet_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


_OWN_FILE = re.compile(r"st\d{4}/se\d{2}/im\d{4}(\.dcm)?")


def _remove_stale(dicom: Path, keep: set[str]) -> int:
    """Delete files of an earlier run (our naming pattern only) that this run did not write."""
    removed = 0
    if not dicom.is_dir():
        return 0
    for path in sorted(dicom.rglob("*")):
        rel = path.relative_to(dicom).as_posix()
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if path.is_file() and (stale_tmp or (_OWN_FILE.fullmatch(rel) and f"dicom/{rel}" not in keep)):
            path.unlink()
            removed += 1
    for d in sorted((p for p in dicom.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    return removed


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize` wrote."""

    out: Path
    patients: int
    studies: int
    scans: int  # usable scans (the rest are to be excluded)
    slices: int  # annotated axial slices of the usable scans
    class_counts: tuple[int, int, int]  # those slices per class (CLASSES order)
    exclusions: tuple[tuple[str, str], ...]  # (study folder, reason)
    files: int  # DICOM files
    seconds: float

    def summary(self) -> str:
        non, normal, blend = self.class_counts
        ratio = (f"{non / blend:.1f} : {normal / blend:.1f} : 1" if blend else "no blend-sign slice")
        excl = ", ".join(f"{folder} {reason}" for folder, reason in self.exclusions) or "none"
        return "\n".join([
            f"synthetic cohort in {self.out}: dicom/, annotations.csv, truth.parquet, clinical.csv, {MANIFEST}",
            f"  {self.patients} patients, {self.studies} studies ({self.scans} usable scans + "
            f"{len(self.exclusions)} to exclude), {self.files} DICOM files",
            f"  {self.slices} annotated slices in usable scans: non_ich {non}, normal_ich {normal}, "
            f"blend_sign {blend} (non : normal : blend = {ratio}; paper ≈ 22 : 9 : 1)",
            f"  exclusion studies: {excl}",
            f"  {self.seconds:.1f} s",
        ])


def _manifest(cohort: Cohort, files: int, counts: dict[str, dict[str, int]]) -> bytes:
    cfg = cohort.cfg
    doc = {
        "format": 1, "seed": cfg.seed, "config": dataclasses.asdict(cfg),
        "studies": len(cohort.studies), "patients": len(cohort.patients), "scans": len(cohort.usable()),
        "dicom_files": files, "class_counts": counts,
        "exclusions": [{"folder": s.folder, "study_instance_uid": s.uid, "reason": s.exclusion}
                       for s in cohort.studies if s.exclusion],
        "lesion_rates": dataclasses.asdict(cohort.rates), "readers": dataclasses.asdict(cohort.readers),
        "box_convention": "pixels of the original slice, x = column, y = row, half-open [min, max)",
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def synthesize(out: Path, cfg: SynthConfig, *, progress: bool = True) -> SynthResult:
    """Write the synthetic cohort for ``cfg`` into ``out`` (see the module docstring for the layout)."""
    from blendsign.progress import progress as progress_bar

    start = time.perf_counter()
    out = Path(out)
    cohort = plan_cohort(cfg)
    files: list[str] = []
    truth_rows: list[dict] = []
    ann_rows: list[list] = []
    for study in progress_bar(cohort.studies, desc="synth", unit="study", enabled=progress):
        f, t, a = _write_study(out, study, cohort)
        files += f
        truth_rows += t
        ann_rows += a
    removed = _remove_stale(out / "dicom", set(files))
    if removed:
        log.info("removed %d files of an earlier run from %s", removed, out / "dicom")
    write_bytes_atomic(out / "annotations.csv", _csv_bytes(ANNOTATION_COLUMNS, ann_rows))
    write_bytes_atomic(out / "clinical.csv", _csv_bytes(
        ("study_instance_uid", "postoperative"),
        [(s.uid, "true" if s.postoperative else "false") for s in cohort.studies]))
    write_bytes_atomic(out / "truth.parquet", _parquet_bytes(truth_rows))
    usable = [int(s.truth.cls[i]) for s in cohort.usable() for i in range(len(s.t))]
    excluded = [int(s.truth.cls[i]) for s in cohort.studies if s.exclusion for i in range(len(s.t))]
    counts = {name: dict(zip(CLASSES, np.bincount(v, minlength=3).tolist(), strict=True))
              for name, v in (("usable", usable), ("excluded", excluded))}
    write_bytes_atomic(out / MANIFEST, _manifest(cohort, len(files), counts))
    return SynthResult(
        out=out, patients=len(cohort.patients), studies=len(cohort.studies), scans=len(cohort.usable()),
        slices=len(usable), class_counts=(counts["usable"]["non_ich"], counts["usable"]["normal_ich"],
                                          counts["usable"]["blend_sign"]),
        exclusions=tuple((s.folder, s.exclusion) for s in cohort.studies if s.exclusion),
        files=len(files), seconds=time.perf_counter() - start,
    )
