"""Readers' labels: agreement (Fleiss' κ), majority-vote fusion, box fusion, importers.

Paper §Data collection and labeling: three radiologists label every slice; the gold standard is the
majority vote; agreement is reported as Fleiss' κ per class (Table 2).
"""

from __future__ import annotations

import numpy as np


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
