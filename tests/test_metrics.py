"""blendsign.metrics against a hand-computed confusion matrix and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from blendsign.metrics import confusion, per_class_metrics


def test_per_class_metrics_by_hand() -> None:
    # true:   0 0 0 0 1 1 1 2 2 2
    # pred:   0 0 0 1 1 1 2 2 2 0
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), pred] = 0.8
    cm = confusion(labels, pred)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [0, 2, 1], [1, 0, 2]])
    m = per_class_metrics(probs, labels)
    # class 0: TP 3, FN 1, FP 1, TN 5
    assert m["sensitivity_non_ich"] == 3 / 4 and m["specificity_non_ich"] == 5 / 6
    assert m["f1_non_ich"] == 6 / 8
    # class 2 (blend sign): TP 2, FN 1, FP 1, TN 6
    assert m["sensitivity_blend_sign"] == 2 / 3 and m["specificity_blend_sign"] == 6 / 7
    assert m["accuracy"] == 7 / 10
    for c, name in enumerate(["non_ich", "normal_ich", "blend_sign"]):
        assert math.isclose(m[f"f1_{name}"], f1_score(labels == c, pred == c))
        assert math.isclose(m[f"auc_{name}"], roc_auc_score(labels == c, probs[:, c]))


def test_missing_class_gives_nan_not_an_error() -> None:
    m = per_class_metrics(np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]]), np.array([0, 1]))
    assert math.isnan(m["auc_blend_sign"]) and math.isnan(m["sensitivity_blend_sign"])
    assert m["specificity_blend_sign"] == 1.0 and m["auc_non_ich"] == 1.0
