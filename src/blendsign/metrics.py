"""Per-class one-vs-rest metrics (paper §Evaluation metric): sensitivity, specificity, F1, ROC AUC.

Decision rule: the predicted class is the argmax of the probabilities.
"""

from __future__ import annotations

import math

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
