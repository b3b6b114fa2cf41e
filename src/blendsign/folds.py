"""Patient-level cross-validation folds (paper §Evaluation protocol: 5-fold cross-validation).

Every scan goes to one fold; all scans of a patient go to the same fold, so no patient is in both the
training and the test part of any split. Folds are stratified by each scan's worst gold class
(blend_sign > normal_ich > non_ich) so the class mix per fold is as even as the patients allow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blendsign import CLASSES
from blendsign.config import FoldConfig
from blendsign.errors import InputError
from blendsign.labels import LABELS_FILE
from blendsign.storage import atomic_path, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
FOLDS_FILE = "folds.parquet"
FOLDS_REPORT, FOLDS_REPORT_MD = "folds.json", "folds.md"  # k, seed and the per-fold table; the same as a table
SEVERITY: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}  # non_ich < normal_ich < blend_sign


def fold_name(fold: int | None) -> str:
    """A training job's name in MLflow runs and folders: ``fold<k>``, or ``refit`` for the model trained on all."""
    return "refit" if fold is None else f"fold{fold}"


def scan_table(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per scan: ``scan_id, patient_key, scan_label`` (worst slice class), sorted by scan_id.

    Args:
        labels: slice labels with ``scan_id``, ``patient_key``, ``label`` (``labels.parquet``).
    """
    unknown = sorted(set(labels["label"]) - set(CLASSES))
    if unknown:
        raise InputError(f"unknown label(s) {unknown}; expected {list(CLASSES)}")
    patients = labels.groupby("scan_id")["patient_key"].nunique()
    if (patients > 1).any():
        raise InputError(f"scan(s) with more than one patient_key: {sorted(patients[patients > 1].index)[:5]}")
    worst = labels.assign(severity=labels["label"].map(SEVERITY)).groupby("scan_id", sort=True).agg(
        patient_key=("patient_key", "first"), severity=("severity", "max")
    )
    return pd.DataFrame({
        "scan_id": worst.index.astype(str),
        "patient_key": worst["patient_key"].astype(str).to_numpy(),
        "scan_label": [CLASSES[s] for s in worst["severity"]],
    })


def assign_folds(scans: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of each row of ``scan_table`` output: stratified group K-fold, groups = patient_key.

    The greedy of scikit-learn's ``StratifiedGroupKFold(shuffle=True)``, written out because that one
    refuses cohorts where every class has fewer than k scans: patients are shuffled with ``seed``,
    then ordered by their share of the cohort's scans per class (largest first, stable), and each goes
    to the fold where it adds least to ``Σ_class (fold share − 1/k)²``; ties → fewest scans, lowest
    fold. An empty fold always costs least, so all k folds are filled. Depends only on the rows and
    ``seed`` (deterministic).
    """
    keys = scans["patient_key"].to_numpy(dtype=str)
    patients, inverse = np.unique(keys, return_inverse=True)
    n = len(patients)
    if k < 2 or k > n:
        raise InputError(f"k = {k} folds needs 2 ≤ k ≤ the number of patients ({n})")
    counts = np.zeros((n, len(CLASSES)))
    np.add.at(counts, (inverse, scans["scan_label"].map(SEVERITY).to_numpy()), 1)
    share = counts / np.maximum(counts.sum(axis=0), 1)
    order = np.random.default_rng(seed).permutation(n)
    order = order[np.argsort(-share[order].sum(axis=1), kind="stable")]
    fold_share, fold_scans = np.zeros((k, len(CLASSES))), np.zeros(k)
    patient_fold = np.empty(n, dtype=np.int32)
    for p in order:
        cost = np.round((share[p] * (2 * fold_share + share[p] - 2 / k)).sum(axis=1), 12)
        best = int(np.lexsort((np.arange(k), fold_scans, cost))[0])
        patient_fold[p] = best
        fold_share[best] += share[p]
        fold_scans[best] += counts[p].sum()
    return patient_fold[inverse]


def fold_counts(labels: pd.DataFrame, folds: pd.DataFrame, k: int) -> list[dict[str, int]]:
    """Per fold: patients, scans and slices per gold class (``fold`` as the first key)."""
    slices = labels.merge(folds[["scan_id", "fold"]], on="scan_id", how="left")
    rows = []
    for f in range(k):
        mine = slices[slices["fold"] == f]
        in_fold = folds[folds["fold"] == f]
        row = {"fold": f, "patients": int(in_fold["patient_key"].nunique()), "scans": len(in_fold)}
        row.update({c: int((mine["label"] == c).sum()) for c in CLASSES})
        row["slices"] = len(mine)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class FoldsResult:
    """What ``make_folds`` wrote: one row of counts per fold (``fold_counts``)."""

    out_dir: Path
    k: int
    seed: int
    patients: int
    scans: int
    table: tuple[dict[str, int], ...]

    def summary(self) -> str:
        return f"{self.k} patient-level folds (seed {self.seed}) for {self.scans} scans of " \
               f"{self.patients} patients → {self.out_dir}\n" + folds_markdown(self.table)


def folds_markdown(table: tuple[dict[str, int], ...] | list[dict[str, int]]) -> str:
    """The per-fold table as Markdown (slice counts per gold class), with a warning for a class a fold lacks."""
    cols = ["fold", "patients", "scans", *CLASSES, "slices"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in table]
    total = {c: sum(row[c] for row in table) for c in cols[1:]}
    lines.append("| **all** | " + " | ".join(str(total[c]) for c in cols[1:]) + " |")
    lines += [f"\n**Warning:** {w}" for w in missing_classes(table)]
    return "\n".join(lines) + "\n"


def missing_classes(table: tuple[dict[str, int], ...] | list[dict[str, int]]) -> list[str]:
    """A line per fold that holds no slice of a class: its sensitivity and AUC for that class are undefined."""
    return [f"fold {row['fold']} holds no {c} slice: its {c} sensitivity and AUC are undefined (fewer folds, or "
            "more scans, fix it)" for row in table for c in CLASSES if row[c] == 0]


def make_folds(labels_dir: str | Path, out_dir: str | Path, cfg: FoldConfig | None = None) -> FoldsResult:
    """Assign scans of ``labels_dir/labels.parquet`` to ``cfg.k`` patient-level folds.

    Writes ``folds.parquet`` (``scan_id, patient_key, scan_label, fold``), ``folds.json`` (k, seed and
    the per-fold table) and ``folds.md``; each atomically, after everything is computed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = cfg or FoldConfig()
    path, out_dir = Path(labels_dir) / LABELS_FILE, Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no labels.parquet in {labels_dir} (run `blendsign fuse` first)")
    labels = pq.read_table(path, columns=["scan_id", "patient_key", "label"]).to_pandas()
    if labels.empty:
        raise InputError(f"{path} has no slices")
    scans = scan_table(labels)
    scans["fold"] = assign_folds(scans, cfg.k, cfg.seed)
    table = tuple(fold_counts(labels, scans, cfg.k))
    result = FoldsResult(out_dir, cfg.k, cfg.seed, int(scans["patient_key"].nunique()), len(scans), table)
    for warning in missing_classes(table):
        log.warning("%s", warning)

    schema = pa.schema([("scan_id", pa.string()), ("patient_key", pa.string()), ("scan_label", pa.string()),
                        ("fold", pa.int32())])
    report: dict[str, Any] = {"k": cfg.k, "seed": cfg.seed, "patients": result.patients, "scans": result.scans,
                              "folds": list(table)}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / FOLDS_FILE) as tmp:
        pq.write_table(pa.Table.from_pydict({c: scans[c].tolist() for c in schema.names}, schema=schema), tmp)
    write_json_atomic(out_dir / FOLDS_REPORT, report)
    write_text_atomic(out_dir / FOLDS_REPORT_MD, f"# Patient-level folds (k = {cfg.k}, seed = {cfg.seed})\n\n"
                      + folds_markdown(table))
    return result


def fold_ids(folds_dir: str | Path) -> list[int]:
    """The folds of a ``make_folds`` output (its ``folds.parquet``), ascending."""
    import pyarrow.parquet as pq

    return sorted({int(f) for f in pq.read_table(Path(folds_dir) / FOLDS_FILE, columns=["fold"]).column("fold")
                   .to_pylist()})
