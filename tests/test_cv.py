"""blendsign.cv and blendsign.evaluate: cross-validation end to end, MLflow metrics, the ablation."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from blendsign import CLASSES
from blendsign.config import load_preset, override
from blendsign.cv import ablation, cross_validate
from blendsign.evaluate import evaluate
from blendsign.folds import make_folds
from blendsign.tracking import Tracker

CFG = override(load_preset("ci"), train={"epochs": 1}, distill={"rounds": 0}, eval={"bootstrap": 50})
PNG = b"\x89PNG\r\n\x1a\n"


def _dirs(cohort: dict[str, Path]) -> dict[str, Path]:
    return {"ingest_dir": cohort["ingest"], "labels_dir": cohort["labels"], "folds_dir": cohort["folds"]}


def test_cross_validation_end_to_end(cohort: dict[str, Path], tmp_path: Path) -> None:
    tracker = Tracker.open("test-cv", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = cross_validate(CFG, **_dirs(cohort), out_dir=tmp_path / "cv", tracker=tracker, progress=False)
    out = tmp_path / "cv" / "evaluation"
    # every labelled slice predicted exactly once, by the model that did not train on it
    pred = pq.read_table(out / "predictions.parquet").to_pandas()
    labels = pq.read_table(cohort["labels"] / "labels.parquet").to_pandas()
    folds = pq.read_table(cohort["folds"] / "folds.parquet").to_pandas()
    assert sorted(pred["instance_key"]) == sorted(labels["instance_key"])
    fold_of = dict(zip(folds["scan_id"], folds["fold"], strict=True))
    assert all(fold_of[s] == f for s, f in zip(pred["scan_id"], pred["fold"], strict=True))
    np.testing.assert_allclose(pred[[f"p_{c}" for c in CLASSES]].sum(1), 1.0, rtol=1e-5)
    # mean over folds is the mean of the per-fold values
    for key, (mean, _) in result.cv.items():
        values = [m[key] for m in result.per_fold.values() if not math.isnan(m[key])]
        assert (math.isnan(mean) and not values) or mean == pytest.approx(np.mean(values))
    for name in ("roc.png", "confusion.png", "calibration.png", "gradcam.png"):
        assert (out / name).read_bytes().startswith(PNG)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decision_rule"] == "argmax" and set(metrics["scan"]) == {"auc_any_ich", "auc_blend_sign"}
    # baselines on the same folds: the prior has no skill, and its accuracy is the held-out share of the training
    # majority class of each fold
    base = metrics["baselines"]
    assert set(base) == {"prior", "hu_rule"}
    train_labels = labels.merge(folds, on="scan_id")
    for k, fold_metrics in base["prior"]["per_fold"].items():
        assert [fold_metrics[f"auc_{c}"] for c in CLASSES] == [0.5, 0.5, 0.5]
        majority = train_labels[train_labels["fold"] != int(k)]["label"].value_counts().idxmax()
        held = pred[pred["fold"] == int(k)]
        assert fold_metrics["accuracy"] == pytest.approx((held["label"] == majority).mean())
    report = (out / "report.md").read_text()
    assert "| prior |" in report and "| hu_rule |" in report and "| model |" in report
    # MLflow: the CV run carries cv_<metric>_<class>, each fold run its own <metric>_<class>
    runs = tracker.client.search_runs([tracker.experiment_id])
    (cv_run,) = [r for r in runs if r.data.tags.get("stage") == "cross-validation"]
    expected = {f"cv_{m}_{c}" for m in ("auc", "sensitivity", "specificity", "f1") for c in CLASSES}
    assert expected <= set(cv_run.data.metrics)
    assert cv_run.data.metrics["cv_auc_blend_sign"] == pytest.approx(result.cv["auc_blend_sign"][0])
    assert cv_run.data.metrics["baseline_prior_cv_auc_normal_ich"] == 0.5 and "baseline_hu_rule_cv_accuracy" in \
        cv_run.data.metrics
    fold_runs = [r for r in runs if r.data.tags.get("stage") == "fold"]
    assert len(fold_runs) == 3 and all("specificity_non_ich" in r.data.metrics for r in fold_runs)
    assert all(r.data.tags["mlflow.parentRunId"] == cv_run.info.run_id for r in fold_runs)
    artifacts = {a.path for a in tracker.client.list_artifacts(cv_run.info.run_id, "evaluation")}
    assert "evaluation/report.md" in artifacts and "evaluation/roc.png" in artifacts
    # the same models against other folds would score slices they trained on: refused
    make_folds(cohort["labels"], tmp_path / "other-folds", replace(CFG.folds, k=3, seed=CFG.folds.seed + 1))
    with pytest.raises(ValueError, match="was not trained on fold 0's training slices"):
        evaluate(CFG, **{**_dirs(cohort), "folds_dir": tmp_path / "other-folds"}, models_dir=tmp_path / "cv" / "models",
                 out_dir=tmp_path / "other-eval", progress=False)


@pytest.mark.slow
def test_ablation_runs_three_settings_and_reuses_the_teacher(cohort: dict[str, Path], tmp_path: Path) -> None:
    cfg = override(CFG, distill={"rounds": 1}, train={"label_noise": 0.3})
    result = ablation(cfg, **_dirs(cohort), out_dir=tmp_path / "abl", progress=False)
    assert list(result.settings) == ["WCE", "WCE+AT", "WCE+AT+SKD"]
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert table.count("| WCE+AT+SKD |") == 3 and "30% of training blend-sign slices" in table
    assert (tmp_path / "abl" / "ablation.png").read_bytes().startswith(PNG)
    teacher = tmp_path / "abl" / "WCE+AT+SKD" / "models" / "fold0" / "round0"
    assert teacher.is_symlink() and (teacher / "model.pt").exists()
    assert (tmp_path / "abl" / "WCE+AT+SKD" / "models" / "fold0" / "round1" / "model.pt").exists()
