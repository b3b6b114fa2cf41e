"""blendsign.metrics against a hand-computed confusion matrix and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from blendsign.metrics import (
    _weighted_metrics,
    bootstrap_ci,
    calibration,
    confusion,
    per_class_metrics,
    scan_auc,
    scan_level,
)


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


# --- bootstrap CIs, scan-level triage, calibration --------------------------------------------------------------------


def _cohort(scans: int, per_scan: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy but informative predictions: ``probs [n, 3]``, ``labels [n]``, ``groups [n]`` (scan ids)."""
    rng = np.random.default_rng(seed)
    n = scans * per_scan
    labels = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels, np.repeat(np.arange(scans), per_scan)


def test_weighted_metrics_match_per_class_metrics_and_sklearn_weights() -> None:
    probs, labels, _ = _cohort(60)
    probs = np.round(probs, 1)  # many ties: AUC must count them ½
    point = per_class_metrics(probs, labels)
    weights = np.random.default_rng(1).integers(0, 3, size=len(labels)).astype(float)
    batch = _weighted_metrics(probs, labels, np.stack([np.ones(len(labels)), weights]))
    assert set(batch) == set(point)
    for key, value in point.items():
        assert math.isclose(batch[key][0], value, rel_tol=1e-12), key
    for c, name in enumerate(["non_ich", "normal_ich", "blend_sign"]):
        expected = roc_auc_score(labels == c, probs[:, c], sample_weight=weights)
        assert math.isclose(batch[f"auc_{name}"][1], expected, rel_tol=1e-12)


def test_bootstrap_ci_contains_point_estimate_and_narrows_with_more_scans() -> None:
    small, large = _cohort(30), _cohort(300)
    ci_small = bootstrap_ci(*small, n_boot=300)
    ci_large = bootstrap_ci(*large, n_boot=300)
    point = per_class_metrics(large[0], large[1])
    assert set(ci_large) == set(point)
    for key, value in point.items():
        low, high = ci_large[key]
        assert low <= value <= high, key
        assert high - low < ci_small[key][1] - ci_small[key][0], key
    assert ci_large == bootstrap_ci(*large, n_boot=300)  # seeded
    assert ci_large != bootstrap_ci(*large, n_boot=300, seed=1)


def test_bootstrap_resamples_scans_not_slices() -> None:
    # 20 scans of 50 slices; within a scan every prediction is right or every one is wrong (10 scans each).
    # Scan resampling sees 20 independent units (accuracy CI about ±0.2); slice resampling would see 1000.
    labels = np.repeat(np.arange(20) % 2, 50)
    right = np.repeat(np.arange(20) < 10, 50)
    pred = np.where(right, labels, 1 - labels)
    probs = np.full((1000, 3), 0.1)
    probs[np.arange(1000), pred] = 0.8
    scans = np.repeat(np.arange(20), 50)
    by_scan = bootstrap_ci(probs, labels, scans, n_boot=400)["accuracy"]
    by_slice = bootstrap_ci(probs, labels, np.arange(1000), n_boot=400)["accuracy"]
    assert by_scan[1] - by_scan[0] > 0.3
    assert by_slice[1] - by_slice[0] < 0.08
    # String scan ids work as well as integers (these sort as the integers do: the same draws).
    names = np.array([f"scan-{i:02d}" for i in scans])
    assert bootstrap_ci(probs, labels, names, n_boot=400)["accuracy"] == by_scan


def test_bootstrap_ci_ignores_undefined_resamples() -> None:
    probs, labels, groups = _cohort(40)
    labels[labels == 2] = 1
    labels[groups == 0] = 2  # blend sign only in scan 0: absent from ~37% of resamples
    ci = bootstrap_ci(probs, labels, groups, n_boot=200)
    assert all(math.isfinite(v) for v in ci["sensitivity_blend_sign"])
    assert all(math.isfinite(v) for v in ci["auc_blend_sign"])
    labels[labels == 2] = 1  # no blend sign anywhere: undefined in every resample
    ci = bootstrap_ci(probs, labels, groups, n_boot=50)
    assert all(math.isnan(v) for v in ci["auc_blend_sign"])
    assert all(math.isfinite(v) for v in ci["specificity_blend_sign"])


def test_bootstrap_ci_is_fast_enough_for_a_cohort() -> None:
    import time

    probs, labels, groups = _cohort(650)  # 5,200 slices
    start = time.perf_counter()
    ci = bootstrap_ci(probs, labels, groups, n_boot=1000)
    assert time.perf_counter() - start < 15  # ~1 s on an idle 2-core CPU
    assert all(math.isfinite(v) for pair in ci.values() for v in pair)


def test_scan_level_by_hand() -> None:
    groups = np.array(["s2", "s1", "s1", "s2", "s3", "s1"])
    labels = np.array([0, 1, 0, 2, 0, 0])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.2, 0.7, 0.1],
            [0.6, 0.1, 0.3],
            [0.3, 0.3, 0.4],
            [0.95, 0.04, 0.01],
            [0.8, 0.1, 0.1],
        ]
    )
    s = scan_level(probs, labels, groups)
    assert s["scan"].tolist() == ["s1", "s2", "s3"]
    np.testing.assert_allclose(s["p_blend"], [0.3, 0.4, 0.01])
    np.testing.assert_allclose(s["p_ich"], [0.8, 0.7, 0.05])
    assert s["label"].tolist() == [1, 2, 0] and s["n_slices"].tolist() == [3, 2, 1]
    auc = scan_auc(probs, labels, groups)
    # any ICH: s1 (0.8), s2 (0.7) positive vs s3 (0.05) → 1.0; blend: s2 (0.4) vs s1 (0.3), s3 (0.01) → 1.0
    assert auc == {"auc_any_ich": 1.0, "auc_blend_sign": 1.0}
    labels_no_blend = np.where(labels == 2, 1, labels)
    auc = scan_auc(probs, labels_no_blend, groups)
    assert auc["auc_any_ich"] == 1.0 and math.isnan(auc["auc_blend_sign"])


def test_calibration_by_hand() -> None:
    # Every slice says blend sign with 0.8; half are blend sign, half non-ICH.
    probs = np.tile([0.1, 0.1, 0.8], (10, 1))
    labels = np.array([2] * 5 + [0] * 5)
    cal = calibration(probs, labels, bins=10)
    blend = cal["blend_sign"]
    assert math.isclose(blend["ece"], 0.3)
    assert blend["bin_count"] == [0] * 8 + [10, 0]
    assert math.isclose(blend["bin_confidence"][8], 0.8) and math.isclose(blend["bin_accuracy"][8], 0.5)
    assert math.isnan(blend["bin_accuracy"][0]) and math.isnan(blend["bin_confidence"][0])
    assert math.isclose(cal["non_ich"]["ece"], 0.4)  # confidence 0.1, frequency 0.5
    assert math.isclose(cal["normal_ich"]["ece"], 0.1)  # confidence 0.1, frequency 0
    # A probability of exactly 1.0 falls in the last bin; ECE weights bins by their share of slices.
    probs = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.25, 0.75, 0.0]])
    cal = calibration(probs, np.array([0, 0, 0, 1]), bins=4)
    assert cal["non_ich"]["bin_count"] == [0, 2, 0, 2]
    assert math.isclose(cal["non_ich"]["ece"], 0.5 * abs(0.5 - 0.25) + 0.5 * abs(1.0 - 1.0))
