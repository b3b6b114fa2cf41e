"""Trivial baselines, scored beside every evaluation on the same held-out folds and metrics.

A model that does not beat them has learnt nothing worth registering (the registry's gate,
:func:`blendsign.registry.baseline_verdict`):

- ``prior``: every held-out slice gets the training folds' class shares as its probabilities. No skill: every
  class's AUC is 0.5 and its accuracy is the share of the training majority class among the held-out slices.
- ``hu_rule``: one number per slice, the share of intracranial pixels in the acute-blood range,
  ``#(ACUTE_BLOOD) / #(INTRACRANIAL)`` of the slice's HU (acute hematoma 50–90 HU against brain and blood
  0–100 HU), mapped to class probabilities by a multinomial logistic regression fitted on the training folds.
  What a one-line threshold on the image gets without any learnt feature.
"""

from __future__ import annotations

import math

import numpy as np

from blendsign import CLASSES

ACUTE_BLOOD = (50, 90)  # HU of acute, clotted blood
INTRACRANIAL = (0, 100)  # HU of brain parenchyma, CSF-free tissue and blood: what lies inside the skull
NAMES: tuple[str, ...] = ("prior", "hu_rule")


def blood_share(hu: np.ndarray) -> float:
    """``#(ACUTE_BLOOD) / #(INTRACRANIAL)`` pixels of one slice ``hu [rows, cols]`` (0 without intracranial
    pixels); ranges are inclusive."""
    inside = (hu >= INTRACRANIAL[0]) & (hu <= INTRACRANIAL[1])
    n = int(inside.sum())
    if n == 0:
        return 0.0
    return float(((hu >= ACUTE_BLOOD[0]) & (hu <= ACUTE_BLOOD[1])).sum() / n)


def prior(train_labels: np.ndarray, n: int) -> np.ndarray:
    """``[n, K]``: the class shares of ``train_labels [m]`` on every row."""
    shares = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=len(CLASSES)) / len(train_labels)
    return np.tile(shares, (n, 1))


def hu_rule(train_feature: np.ndarray, train_labels: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """``[n, K]`` class probabilities of ``feature [n]`` from a multinomial logistic regression (standardised
    inputs) on the training slices' ``train_feature [m]``; a class absent from training gets probability 0 (and a
    single class, 1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_labels = np.asarray(train_labels, dtype=np.int64)
    present = np.unique(train_labels)
    out = np.zeros((len(feature), len(CLASSES)))
    if len(present) == 1:
        out[:, present[0]] = 1.0
        return out
    fit = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(_design(train_feature), train_labels)
    out[:, fit.classes_] = fit.predict_proba(_design(feature))
    return out


def _design(feature: np.ndarray) -> np.ndarray:
    """The share and its square root (blood fractions are small and skewed), ``[n, 2]``."""
    f = np.asarray(feature, dtype=np.float64).reshape(-1, 1)
    return np.hstack([f, np.sqrt(f)])


def fold_baselines(train_feature: np.ndarray, train_labels: np.ndarray, feature: np.ndarray) -> dict[str, np.ndarray]:
    """Every baseline's held-out probabilities ``[n, K]`` for one fold."""
    return {"prior": prior(train_labels, len(feature)), "hu_rule": hu_rule(train_feature, train_labels, feature)}


COMPARED = ("accuracy", *(f"auc_{c}" for c in CLASSES), *(f"sensitivity_{c}" for c in CLASSES))


def baseline_table(cv: dict[str, tuple[float, float]], baselines: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Markdown: the model and each baseline (:mod:`blendsign.baselines`), mean over folds of ``COMPARED``."""
    lines = ["| | " + " | ".join(COMPARED) + " |", "|---|" + "---:|" * len(COMPARED)]
    for name, values in (("model", cv), *baselines.items()):
        cells = [values.get(m, (math.nan, math.nan))[0] for m in COMPARED]
        lines.append(f"| {name} | " + " | ".join("n/a" if math.isnan(v) else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)


def shortfalls(cv: dict[str, tuple[float, float]], baselines: dict[str, dict[str, tuple[float, float]]],
               margin: float) -> list[str]:
    """Why a model is no better than a trivial one (empty when it is better): every class's CV AUC must beat
    the no-skill prior's 0.5 by more than ``margin``, and its CV accuracy must reach the prior's (always the
    training majority class). ``cv`` and each of ``baselines``: ``"<metric>_<class>"`` → (mean, sd) over folds.
    The evaluation report says these; the registry's gate refuses a version for them."""
    out = []
    for c in CLASSES:
        auc = cv.get(f"auc_{c}", (math.nan, math.nan))[0]
        if not auc > 0.5 + margin:
            shown = "undefined" if math.isnan(auc) else f"{auc:.4f}"
            out.append(f"cv_auc_{c} {shown} does not beat the no-skill baseline (0.5) by more than {margin:g}")
    prior = baselines.get("prior", {}).get("accuracy", (math.nan, math.nan))[0]
    accuracy = cv.get("accuracy", (math.nan, math.nan))[0]
    if not math.isnan(prior) and not accuracy >= prior:
        out.append(f"cv_accuracy {accuracy:.4f} is below always answering the majority class ({prior:.4f})")
    return out
