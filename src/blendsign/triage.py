"""Scan-level triage against scan-level reads (CQ500's three-reader ``reads.csv``).

CQ500 (Chilamkurthy et al., Lancet 2018) labels scans, not slices: three radiologists say per scan whether it
shows an intracranial hemorrhage (ICH) and which subtypes. The gold standard is the majority of the three, as for
the paper's slice labels (§Data collection and labeling); agreement is Fleiss' κ per finding. A model's scan score
is its most suspicious slice, ``max(1 − p(non_ich))`` (:func:`blendsign.metrics.scan_level`), and the scan is
flagged at ``score ≥ threshold``.

``reads.csv``: one row per scan; ``name`` is the scan's PatientID in its DICOM files (``CQ500-CT-<n>``; the folder
spelling ``CQ500CT<n>`` joins too) and ``R<r>:<finding>`` is reader r's 0/1 for r = 1, 2, 3 and each of
:data:`FINDINGS` (CQ500's other columns, fractures, mass effect, …, are ignored). Names are joined to the
ingest's pseudonymous ``patient_key`` through the ingest's key; no name is written out: scans are named by
``scan_id`` and reads by their line in the CSV.

Output (``OUT``):
    triage.json      join counts, readers' κ, the model's scan metrics beside the trivial baselines
    triage.md        the same for people
    triage_roc.png   the ROC curve, the operating point and the baselines
    scans.parquet    per scored scan: scan_id, slices, score, gold ICH and subtypes, the readers' ICH votes
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score, roc_curve

from blendsign.errors import InputError
from blendsign.ingest import check_format, decode_hu, scan_file
from blendsign.labels import _Problems, _read_csv, fleiss_kappa, read_ingested_slices
from blendsign.storage import atomic_path, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

FINDINGS: tuple[str, ...] = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH")
READERS: tuple[str, ...] = ("R1", "R2", "R3")
REPORT = "triage.json"


@dataclass(frozen=True)
class ScanRead:
    """One row of ``reads.csv``: the scan's name and ``votes[finding]`` = readers (0–3) who marked it."""

    row: int  # CSV line number (header = 1)
    name: str
    votes: dict[str, int]

    def gold(self, finding: str) -> bool:
        """Majority of the three readers."""
        return 2 * self.votes[finding] > len(READERS)


def read_reads(path: str | Path) -> list[ScanRead]:
    """CQ500's ``reads.csv`` validated: every ``R<r>:<finding>`` 0 or 1, names unique and non-empty; an error
    lists every bad row."""
    columns = ["name", *(f"{r}:{f}" for r in READERS for f in FINDINGS)]
    problems = _Problems(path)
    out: list[ScanRead] = []
    first: dict[str, int] = {}
    for row, rec in _read_csv(path, columns):
        name = rec["name"]
        if not name:
            problems.add("empty name", [row])
            continue
        if name in first:
            problems.add("name repeats an earlier row", [row])
            continue
        first[name] = row
        bad = [c for c in columns[1:] if rec[c] not in ("0", "1")]
        if bad:
            problems.add(f"a reader's value is not 0 or 1 ({', '.join(bad[:3])}{'…' if len(bad) > 3 else ''})",
                         [row])
            continue
        out.append(ScanRead(row, name, {f: sum(rec[f"{r}:{f}"] == "1" for r in READERS) for f in FINDINGS}))
    problems.raise_if_any()
    if not out:
        raise InputError(f"{path}: no reads")
    return out


def reader_kappas(reads: Sequence[ScanRead]) -> dict[str, float | None]:
    """Fleiss' κ of the three readers per finding (None when undefined: every scan rated alike)."""
    n = len(READERS)
    out: dict[str, float | None] = {}
    for f in FINDINGS:
        counts = np.array([[n - r.votes[f], r.votes[f]] for r in reads])
        kappa = fleiss_kappa(counts)
        out[f] = None if math.isnan(kappa) else kappa
    return out


def _name_spellings(name: str) -> tuple[str, ...]:
    """``CQ500-CT-12`` and ``CQ500CT12`` (the folder names) are the same scan."""
    return tuple(dict.fromkeys((name, name.replace("-", ""))))


@dataclass(frozen=True)
class Joined:
    """Reads matched to ingested scans: ``scans[scan_id]`` → its read; what did not join, by CSV row."""

    scans: dict[str, ScanRead]
    unmatched_rows: tuple[int, ...]  # reads without an ingested scan (excluded, not exported, misspelt)
    unread_scans: int  # ingested scans without a read


def join(reads: Sequence[ScanRead], ingest_dir: str | Path) -> Joined:
    """Match reads to the ingest's scans through the keyed patient pseudonym."""
    slices, pz = read_ingested_slices(ingest_dir)
    scans_of: dict[str, set[str]] = defaultdict(set)
    for rec in slices.values():
        scans_of[rec["patient_key"]].add(rec["scan_id"])
    matched: dict[str, ScanRead] = {}
    unmatched = []
    for read in reads:
        found = set().union(*(scans_of.get(pz.patient(s), set()) for s in _name_spellings(read.name)))
        if not found:
            unmatched.append(read.row)
        for scan in found:
            matched[scan] = read
    every_scan = set().union(*scans_of.values())
    return Joined(matched, tuple(unmatched), len(every_scan - set(matched)))


def score_scans(model: Any, ingest_dir: str | Path, scans: Sequence[str], *, batch_size: int = 16,
                progress: bool = True) -> dict[str, tuple[float, int]]:
    """Each scan's score (max over its slices of ``1 − p(non_ich)``) and slice count under ``model`` (a loaded
    :class:`blendsign.serving.BlendSignModel`), reading the ingested HU (the served preprocessing)."""
    import torch

    from blendsign import CLASSES
    from blendsign.progress import progress as progress_bar
    from blendsign.serving import to_model_input

    check_format(ingest_dir)
    non_ich = CLASSES.index("non_ich")
    out: dict[str, tuple[float, int]] = {}
    bar = progress_bar(total=len(scans), desc="triage", unit="scan", enabled=progress)
    try:
        for scan in scans:
            table = pq.read_table(scan_file(ingest_dir, scan), columns=["hu", "rows", "cols"])
            hu, rows, cols = (table.column(c).to_pylist() for c in ("hu", "rows", "cols"))
            best = -math.inf
            for start in range(0, len(hu), batch_size):
                x = torch.stack([
                    to_model_input(decode_hu(h, r, c), model.data_config)
                    for h, r, c in zip(hu[start : start + batch_size], rows[start : start + batch_size],
                                       cols[start : start + batch_size], strict=True)
                ])
                best = max(best, float((1.0 - model.probabilities(x)[:, non_ich]).max()))
            out[scan] = (best, len(hu))
            bar.update()
    finally:
        bar.close()
    return out


def _rates(flag: np.ndarray, positive: np.ndarray) -> dict[str, float | int]:
    tp, fp = int((flag & positive).sum()), int((flag & ~positive).sum())
    fn, tn = int((~flag & positive).sum()), int((~flag & ~positive).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
            "accuracy": ratio(tp + tn, len(flag))}


def triage_metrics(score: np.ndarray, positive: np.ndarray, *, threshold: float = 0.5, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Scan-level metrics of ``score [S]`` against ``positive [S]`` (bool) and the trivial baselines.

    ``auc`` with a percentile bootstrap 95 % interval over scans (``auc_ci``), the rates at ``score ≥ threshold``,
    the specificity at the first ROC point with sensitivity ≥ 0.95 (a triage operating point), and the
    baselines: flag every scan, flag none, and any constant score (AUC 0.5). ``beats_chance``: the interval's
    lower end is above 0.5.
    """
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    both = bool(positive.any() and (~positive).any())
    out: dict[str, Any] = {"scans": len(score), "positives": int(positive.sum()),
                           "prevalence": float(positive.mean()) if len(score) else math.nan,
                           "threshold": threshold, "at_threshold": _rates(score >= threshold, positive)}
    out["baselines"] = {"flag every scan": _rates(np.ones_like(positive), positive),
                        "flag no scan": _rates(np.zeros_like(positive), positive),
                        "constant score": {"auc": 0.5}}
    if not both:
        out.update(auc=math.nan, auc_ci=(math.nan, math.nan), specificity_at_95_sensitivity=math.nan,
                   beats_chance=False)
        return out
    out["auc"] = float(roc_auc_score(positive, score))
    fpr, tpr, _ = roc_curve(positive, score)
    out["specificity_at_95_sensitivity"] = float(1.0 - fpr[np.argmax(tpr >= 0.95)])
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(score), len(score))
        if positive[i].any() and (~positive[i]).any():
            aucs.append(roc_auc_score(positive[i], score[i]))
    low, high = np.percentile(aucs, [2.5, 97.5])
    out["auc_ci"] = (float(low), float(high))
    out["beats_chance"] = bool(low > 0.5)
    return out


def _scan_table(joined: Joined, scores: dict[str, tuple[float, int]]) -> pa.Table:
    scans = sorted(scores)
    reads = [joined.scans[s] for s in scans]
    cols: dict[str, Any] = {
        "scan_id": scans, "slices": [scores[s][1] for s in scans], "score": [scores[s][0] for s in scans],
        **{f"gold_{f.lower()}": [r.gold(f) for r in reads] for f in FINDINGS},
        "ich_votes": [r.votes["ICH"] for r in reads],
    }
    return pa.table(cols)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _markdown(result: dict[str, Any]) -> str:
    m, j = result["metrics"], result["join"]
    rows = j["unmatched_rows"]
    shown = f" (CSV rows {', '.join(map(str, rows[:20]))}{', …' if len(rows) > 20 else ''})" if rows else ""
    lines = [
        "# Scan-level triage (any ICH)", "",
        f"{j['reads']} reads; {j['scored']} ingested scans scored; {len(rows)} reads without an ingested scan"
        f"{shown}; {j['unread_scans']} ingested scans without a read.", "",
        f"Gold: majority of 3 readers. Score: the scan's most suspicious slice, max(1 − p(non_ich)); flagged at "
        f"score ≥ {m['threshold']}.", "",
        f"**AUC {_fmt(m['auc'])}** (95 % CI {_fmt(m['auc_ci'][0])}–{_fmt(m['auc_ci'][1])}; a constant score: 0.5)"
        f" — {'better than chance' if m['beats_chance'] else '**not shown better than chance**'}. "
        f"Specificity at sensitivity ≥ 0.95: {_fmt(m['specificity_at_95_sensitivity'])}.", "",
        "| | sensitivity | specificity | PPV | NPV | accuracy | TP | FP | FN | TN |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in [("model", m["at_threshold"]), *m["baselines"].items()]:
        if "tp" in r:
            lines.append(f"| {name} | " + " | ".join(_fmt(r[k]) for k in (
                "sensitivity", "specificity", "ppv", "npv", "accuracy", "tp", "fp", "fn", "tn")) + " |")
    lines += ["", "Per subtype (the ICH score against each subtype's majority):", "",
              "| finding | positive scans | AUC | readers' Fleiss κ |", "|---|---|---|---|"]
    for f in FINDINGS:
        sub = result["findings"][f]
        lines.append(f"| {f} | {sub['positives']} | {_fmt(sub['auc'])} | {_fmt(sub['kappa'])} |")
    lines += ["", "![ROC](triage_roc.png)", ""]
    return "\n".join(lines)


def triage(model: Any, ingest_dir: str | Path, reads_csv: str | Path, out_dir: str | Path, *,
           threshold: float = 0.5, progress: bool = True) -> dict[str, Any]:
    """Score the ingested scans that have a read and write ``OUT`` (see the module docstring); returns the
    ``triage.json`` content. ``model``: a loaded :class:`blendsign.serving.BlendSignModel`."""
    from blendsign.plots import triage_roc

    reads = read_reads(reads_csv)
    joined = join(reads, ingest_dir)
    if not joined.scans:
        raise InputError(f"no read of {reads_csv} joins a scan of {ingest_dir}: the names are PatientIDs "
                         "(CQ500-CT-<n>), hashed with the ingest's pseudonym key; was this ingest made from those "
                         "scans, with this key?")
    scores = score_scans(model, ingest_dir, sorted(joined.scans), progress=progress)
    table = _scan_table(joined, scores)
    score = np.asarray(table.column("score").to_pylist())
    metrics = triage_metrics(score, np.asarray(table.column("gold_ich").to_pylist()), threshold=threshold)
    kappas = reader_kappas(reads)
    findings = {}
    for f in FINDINGS:
        positive = np.asarray(table.column(f"gold_{f.lower()}").to_pylist(), dtype=bool)
        both = positive.any() and (~positive).any()
        findings[f] = {"positives": int(positive.sum()), "kappa": kappas[f],
                       "auc": float(roc_auc_score(positive, score)) if both else math.nan}
    result = {
        "join": {"reads": len(reads), "scored": len(scores), "unmatched_rows": list(joined.unmatched_rows),
                 "unread_scans": joined.unread_scans},
        "metrics": metrics, "findings": findings,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "scans.parquet") as tmp:
        pq.write_table(table, tmp)
    triage_roc(np.asarray(table.column("gold_ich").to_pylist()), score, metrics, out / "triage_roc.png")
    write_json_atomic(out / REPORT, result)
    write_text_atomic(out / "triage.md", _markdown(result))
    log.info("triage: %d scans (%d with ICH), AUC %s (95%% CI %s–%s), sensitivity %s / specificity %s at %.2f; "
             "%d reads without a scan", metrics["scans"], metrics["positives"], _fmt(metrics["auc"]),
             _fmt(metrics["auc_ci"][0]), _fmt(metrics["auc_ci"][1]), _fmt(metrics["at_threshold"]["sensitivity"]),
             _fmt(metrics["at_threshold"]["specificity"]), threshold, len(joined.unmatched_rows))
    return result
