"""Per-class one-vs-rest metrics (paper §Evaluation metric): sensitivity, specificity, F1, ROC AUC.

Decision rule: the predicted class is the argmax of the probabilities. Beyond the paper: scan-resampled bootstrap
confidence intervals (:func:`bootstrap_ci`), scan-level triage scores (:func:`scan_level`, :func:`scan_auc`) and
one-vs-rest calibration (:func:`calibration`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from blendsign import CLASSES


def confusion(labels: np.ndarray, pred: np.ndarray, k: int = len(CLASSES)) -> np.ndarray:
    """``[k, k]`` counts, rows = true class, columns = predicted class."""
    return np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def per_class_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"<metric>_<class>": value}`` for sensitivity, specificity, f1, auc, plus ``accuracy``.

    Args:
        probs: ``[n, 3]`` class probabilities.
        labels: ``[n]`` true class indices.

    A metric whose denominator is empty (e.g. AUC with one class present) is NaN.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(probs).argmax(axis=1)
    cm = confusion(labels, pred)
    out: dict[str, float] = {"accuracy": _ratio(np.trace(cm), cm.sum())}
    for c, name in enumerate(CLASSES):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        positives = labels == c
        out[f"sensitivity_{name}"] = _ratio(tp, tp + fn)
        out[f"specificity_{name}"] = _ratio(tn, tn + fp)
        out[f"f1_{name}"] = _ratio(2 * tp, 2 * tp + fp + fn)
        both = positives.any() and (~positives).any()
        out[f"auc_{name}"] = float(roc_auc_score(positives, probs[:, c])) if both else math.nan
    return out


# ---------------------------------------------------------------------------------------------------------------
# Uncertainty, triage and calibration. Scans, not slices, are the independent units: a scan's slices
# share a patient, a scanner and a lesion, so every resampling and every scan-level score groups by scan id.


def _weighted_metrics(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`per_class_metrics` for a batch of slice weightings: each row of ``weights`` counts every slice.

    Args:
        scores: ``[n, 3]`` class probabilities.
        labels: ``[n]`` true class indices.
        weights: ``[B, n]`` non-negative multiplicity of each slice in each of ``B`` resamples.

    Returns:
        ``{key: [B] float64}`` for every key of :func:`per_class_metrics` (NaN where undefined). AUC is the weighted
        Mann–Whitney statistic (ties count ½), which equals ``roc_auc_score(..., sample_weight=w)``.
    """
    k = len(CLASSES)
    pred = scores.argmax(axis=1)
    pair = np.zeros((len(labels), k * k))  # [n, k²] one-hot of (true, pred)
    pair[np.arange(len(labels)), labels * k + pred] = 1.0
    cm = (weights @ pair).reshape(-1, k, k)  # [B, true, pred]
    total = cm.sum(axis=(1, 2))  # [B]

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    out: dict[str, np.ndarray] = {"accuracy": ratio(np.trace(cm, axis1=1, axis2=2), total)}
    for c, name in enumerate(CLASSES):
        tp = cm[:, c, c]
        fn = cm[:, c].sum(axis=1) - tp
        fp = cm[:, :, c].sum(axis=1) - tp
        tn = total - tp - fn - fp
        out[f"sensitivity_{name}"] = ratio(tp, tp + fn)
        out[f"specificity_{name}"] = ratio(tn, tn + fp)
        out[f"f1_{name}"] = ratio(2 * tp, 2 * tp + fp + fn)
        # Weighted AUC: for each positive, the weight of negatives scoring below it (+½ of ties).
        uniq, inv = np.unique(scores[:, c], return_inverse=True)  # [U], [n]
        pos = labels == c
        b, u = weights.shape[0], len(uniq)
        offsets = (np.arange(b)[:, None] * u + inv[None, ~pos]).ravel()  # [B·n_neg]
        neg_at = np.bincount(offsets, weights=weights[:, ~pos].ravel(), minlength=b * u).reshape(b, u)  # [B, U]
        below = np.cumsum(neg_at, axis=1) - 0.5 * neg_at  # [B, U]: negatives strictly below + ½ tied
        num = (weights[:, pos] * below[:, inv[pos]]).sum(axis=1)  # [B]
        out[f"auc_{name}"] = ratio(num, weights[:, pos].sum(axis=1) * weights[:, ~pos].sum(axis=1))
    return out


def bootstrap_ci(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals for every key of :func:`per_class_metrics`, resampling scans.

    Each resample draws the scans (``groups``) with replacement, taking all slices of a drawn scan as many times
    as it was drawn; slices of one scan always move together. Resamples where a metric is undefined (e.g. no
    blend-sign slice drawn) are left out of that metric's interval.

    Args:
        probs: ``[n, 3]`` class probabilities.
        labels: ``[n]`` true class indices.
        groups: ``[n]`` scan id of each slice (any hashable dtype numpy can sort).
        n_boot: number of resamples.
        alpha: ``1 − coverage``: the interval is the ``[α/2, 1 − α/2]`` percentiles (0.05 → 95%).
        seed: random seed.

    Returns:
        ``{key: (low, high)}``; ``(nan, nan)`` for a metric undefined in every resample.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    _, scan = np.unique(np.asarray(groups), return_inverse=True)  # [n] scan index 0..G-1
    if len(scan) == 0:
        return {key: (math.nan, math.nan) for key in per_class_metrics(np.zeros((0, len(CLASSES))), labels)}
    n_scans = int(scan.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(len(labels), 1))  # resamples per batch: ~16 MB of float64 weights
    draws: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = rng.multinomial(n_scans, np.full(n_scans, 1.0 / n_scans), size=b).astype(np.float64)  # [b, G]
        for key, values in _weighted_metrics(probs, labels, counts[:, scan]).items():
            draws.setdefault(key, []).append(values)
    out: dict[str, tuple[float, float]] = {}
    for key, parts in draws.items():
        values = np.concatenate(parts)
        values = values[~np.isnan(values)]
        if len(values) == 0:
            out[key] = (math.nan, math.nan)
        else:
            low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[key] = (float(low), float(high))
    return out


def scan_level(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Per-scan triage scores: the most suspicious slice decides.

    Args:
        probs: ``[n, 3]`` class probabilities.
        labels: ``[n]`` true class indices.
        groups: ``[n]`` scan id of each slice.

    Returns:
        ``scan`` ``[S]`` the sorted unique scan ids; ``p_blend`` ``[S]`` the maximum blend-sign probability over
        the scan's slices; ``p_ich`` ``[S]`` the maximum of ``1 − p(non_ich)``; ``label`` ``[S]`` the scan's worst
        true class (blend_sign > normal_ich > non_ich, i.e. the maximum class index); ``n_slices`` ``[S]``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    scans, idx = np.unique(np.asarray(groups), return_inverse=True)
    p_blend = np.full(len(scans), -np.inf)
    p_ich = np.full(len(scans), -np.inf)
    label = np.zeros(len(scans), dtype=np.int64)
    np.maximum.at(p_blend, idx, probs[:, CLASSES.index("blend_sign")])
    np.maximum.at(p_ich, idx, 1.0 - probs[:, CLASSES.index("non_ich")])
    np.maximum.at(label, idx, labels)
    return {"scan": scans, "p_blend": p_blend, "p_ich": p_ich, "label": label, "n_slices": np.bincount(idx)}


def scan_auc(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Scan-level ROC AUC (the triage view) from :func:`scan_level`.

    Args: as :func:`scan_level`.

    Returns:
        ``auc_any_ich``: ``p_ich`` against "the scan has any hemorrhage slice"; ``auc_blend_sign``: ``p_blend``
        against "the scan has a blend-sign slice"; each NaN when one of its two classes has no scan.
    """
    s = scan_level(probs, labels, groups)
    out: dict[str, float] = {}
    for key, positive, score in (
        ("auc_any_ich", s["label"] >= CLASSES.index("normal_ich"), s["p_ich"]),
        ("auc_blend_sign", s["label"] == CLASSES.index("blend_sign"), s["p_blend"]),
    ):
        both = positive.any() and (~positive).any()
        out[key] = float(roc_auc_score(positive, score)) if both else math.nan
    return out


def calibration(probs: np.ndarray, labels: np.ndarray, *, bins: int = 10) -> dict[str, dict[str, Any]]:
    """One-vs-rest reliability per class with equal-width probability bins.

    Args:
        probs: ``[n, 3]`` class probabilities.
        labels: ``[n]`` true class indices.
        bins: number of equal-width bins on [0, 1] (bin ``i`` holds ``[i/bins, (i+1)/bins)``, the last one
            also 1.0).

    Returns:
        ``{class: {"ece": float, "bin_confidence": [bins], "bin_accuracy": [bins], "bin_count": [bins]}}`` (plain
        lists): mean predicted probability, observed frequency of the class (NaN for an empty bin) and slice
        count per bin; ``ece = Σ_bins (count / n) · |accuracy − confidence|`` (NaN when ``n = 0``).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(CLASSES):
        p = probs[:, c]
        hit = (labels == c).astype(np.float64)
        idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
        count = np.bincount(idx, minlength=bins)
        with np.errstate(divide="ignore", invalid="ignore"):
            conf = np.bincount(idx, weights=p, minlength=bins) / count
            acc = np.bincount(idx, weights=hit, minlength=bins) / count
        filled = count > 0
        ece = float((count[filled] / n * np.abs(acc[filled] - conf[filled])).sum()) if n else math.nan
        out[name] = {
            "ece": ece,
            "bin_confidence": [float(v) for v in conf],
            "bin_accuracy": [float(v) for v in acc],
            "bin_count": [int(v) for v in count],
        }
    return out
