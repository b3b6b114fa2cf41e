"""blendsign.baselines: the trivial models every evaluation is compared with, in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blendsign.baselines import baseline_table, blood_share, fold_baselines, hu_rule, prior, shortfalls
from blendsign.metrics import per_class_metrics


def test_blood_share_counts_acute_blood_among_intracranial_pixels() -> None:
    """−1000 (air) and 1000 (bone) are outside; of the six pixels in 0–100 HU, 50, 70 and 90 are acute blood."""
    hu = np.array([[-1000, 0, 20, 49], [50, 70, 90, 1000], [101, -5, 91, 100]])
    inside = [0, 20, 49, 50, 70, 90, 91, 100]  # 0–100 inclusive
    assert blood_share(hu) == pytest.approx(3 / len(inside))
    assert blood_share(np.full((4, 4), -1000)) == 0.0


def test_prior_gives_the_training_shares_so_auc_is_chance_and_accuracy_the_majority_share() -> None:
    train = np.array([0, 0, 0, 0, 1, 1, 2, 0])  # shares 5/8, 2/8, 1/8
    probs = prior(train, 5)
    np.testing.assert_allclose(probs, np.tile([5 / 8, 2 / 8, 1 / 8], (5, 1)))
    held_out = np.array([0, 1, 1, 2, 0])
    m = per_class_metrics(probs, held_out)
    assert all(m[f"auc_{c}"] == 0.5 for c in ("non_ich", "normal_ich", "blend_sign"))
    assert m["accuracy"] == pytest.approx(2 / 5)  # always non_ich, the training majority: 2 of 5 held-out slices


def test_hu_rule_ranks_by_the_feature_and_copes_with_missing_classes() -> None:
    train_f = np.array([0.0, 0.01, 0.02, 0.2, 0.25, 0.3, 0.6, 0.7])
    train_y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    f = np.array([0.005, 0.22, 0.65, 0.015])
    probs = hu_rule(train_f, train_y, f)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert probs.argmax(1).tolist() == [0, 1, 2, 0]
    m = per_class_metrics(probs, np.array([0, 1, 2, 0]))
    assert m["auc_non_ich"] == 1.0 and m["auc_blend_sign"] == 1.0 and m["accuracy"] == 1.0
    two = hu_rule(train_f[:6], train_y[:6], f)  # no blend sign in training: probability 0
    assert (two[:, 2] == 0).all() and np.allclose(two.sum(1), 1.0)
    one = hu_rule(train_f[:3], train_y[:3], f)
    np.testing.assert_array_equal(one, np.tile([1.0, 0.0, 0.0], (4, 1)))
    assert set(fold_baselines(train_f, train_y, f)) == {"prior", "hu_rule"}


def test_shortfalls_name_each_failing_metric() -> None:
    cv = {"auc_non_ich": (0.9, 0.0), "auc_normal_ich": (0.54, 0.1), "auc_blend_sign": (math.nan, math.nan),
          "accuracy": (0.29, 0.0)}
    base = {"prior": {"accuracy": (0.71, 0.0)}}
    assert shortfalls(cv, base, 0.05) == [
        "cv_auc_normal_ich 0.5400 does not beat the no-skill baseline (0.5) by more than 0.05",
        "cv_auc_blend_sign undefined does not beat the no-skill baseline (0.5) by more than 0.05",
        "cv_accuracy 0.2900 is below always answering the majority class (0.7100)",
    ]
    good = {"auc_non_ich": (0.9, 0.0), "auc_normal_ich": (0.8, 0.0), "auc_blend_sign": (0.95, 0.0),
            "accuracy": (0.71, 0.0)}
    assert shortfalls(good, base, 0.05) == []  # accuracy equal to the prior's is enough
    table = baseline_table(good, {"prior": {"accuracy": (0.71, 0.0), "auc_non_ich": (0.5, 0.0)}})
    assert "| model | 0.710 | 0.900 | 0.800 | 0.950 |" in table and "| prior | 0.710 | 0.500 | n/a |" in table
