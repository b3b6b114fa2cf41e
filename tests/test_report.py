"""The self-contained HTML report and the Kubeflow UI views (blendsign.report), against hand-computed values."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from blendsign import CLASSES, METRICS
from blendsign.html_report import HTML_REPORT_FILE, html_report, write_html_report
from blendsign.report import (
    FIGURES_NOTE,
    confusion_matrix_metadata,
    fill_kfp_outputs,
    kfp_classification_views,
    roc_points,
)
from blendsign.storage import write_json_atomic


def _point(threshold: float, fpr: float, recall: float) -> dict[str, float]:
    return {"confidenceThreshold": threshold, "falsePositiveRate": fpr, "recall": recall}


# scores [0.9, 0.8, 0.3, 0.1], positives [1, 0, 1, 0]: each threshold admits one more slice, alternately a
# positive (recall + 1/2) and a negative (FPR + 1/2); the (0, 0) end at threshold 1.0
TINY_ROC = [_point(1.0, 0.0, 0.0), _point(0.9, 0.0, 0.5), _point(0.8, 0.5, 0.5), _point(0.3, 0.5, 1.0),
            _point(0.1, 1.0, 1.0)]


def test_roc_points_tiny_case() -> None:
    assert roc_points([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == TINY_ROC
    # a top score of 1.0: the (0, 0) end lies just above it, and threshold 1.0 admits that slice
    assert roc_points(np.array([1.0, 0.5]), np.array([True, False])) == [
        _point(float(np.nextafter(1.0, 2.0)), 0.0, 0.0), _point(1.0, 0.0, 1.0), _point(0.5, 1.0, 1.0)]


def test_roc_points_undefined_curve_and_bad_arguments() -> None:
    assert roc_points([0.9, 0.1], [0, 0]) == []  # no positive
    assert roc_points([0.9, 0.1], [1, 1]) == []  # no negative
    with pytest.raises(ValueError, match="max_points"):
        roc_points([0.9, 0.1], [1, 0], max_points=1)
    with pytest.raises(ValueError, match="one length"):
        roc_points([0.9, 0.1, 0.5], [1, 0])


def test_roc_points_subsampling_keeps_both_ends() -> None:
    rng = np.random.default_rng(0)
    positives = rng.random(5000) < 0.3
    scores = np.clip(rng.normal(0.4 + 0.2 * positives, 0.2), 0.0, 1.0)
    full = roc_points(scores, positives, max_points=10**6)
    assert len(full) > 500
    for max_points in (2, 3, 200):
        sub = roc_points(scores, positives, max_points=max_points)
        assert len(sub) == max_points
        assert sub[0] == full[0] and sub[-1] == full[-1]
        assert (sub[0]["falsePositiveRate"], sub[0]["recall"]) == (0.0, 0.0)
        assert (sub[-1]["falsePositiveRate"], sub[-1]["recall"]) == (1.0, 1.0)
        assert all(p in full for p in sub)
        thresholds = [p["confidenceThreshold"] for p in sub]
        assert thresholds == sorted(thresholds, reverse=True) and len(set(thresholds)) == len(thresholds)


def test_confusion_matrix_metadata() -> None:
    labels = ["non_ich", "non_ich", "non_ich", "normal_ich", "normal_ich", "blend_sign"]
    preds = ["non_ich", "normal_ich", "non_ich", "normal_ich", "blend_sign", "non_ich"]
    assert confusion_matrix_metadata(labels, preds, CLASSES) == {
        "annotationSpecs": [{"displayName": "non_ich"}, {"displayName": "normal_ich"}, {"displayName": "blend_sign"}],
        "rows": [{"row": [2, 1, 0]}, {"row": [0, 1, 1]}, {"row": [1, 0, 0]}],
    }
    reordered = confusion_matrix_metadata(labels, preds, ["blend_sign", "normal_ich", "non_ich"])
    assert reordered["rows"] == [{"row": [0, 0, 1]}, {"row": [1, 1, 0]}, {"row": [0, 1, 2]}]
    with pytest.raises(ValueError, match="outside the classes"):
        confusion_matrix_metadata(["non_ich"], ["edh"], CLASSES)


# out-of-fold predictions of 4 slices, no blend_sign label; argmax predictions
PREDICTIONS = {
    "scan_id": ["s1", "s1", "s2", "s2"],
    "slice_index": [0, 1, 0, 1],
    "instance_key": ["k0", "k1", "k2", "k3"],
    "fold": [0, 0, 1, 1],
    "label": ["non_ich", "normal_ich", "non_ich", "normal_ich"],
    "pred": ["non_ich", "non_ich", "normal_ich", "normal_ich"],
    "p_non_ich": [0.9, 0.8, 0.3, 0.1],
    "p_normal_ich": [0.05, 0.15, 0.6, 0.85],
    "p_blend_sign": [0.05, 0.05, 0.1, 0.05],
}
EXPECTED_VIEWS = {
    "roc_non_ich": {"confidenceMetrics": TINY_ROC},
    # positives [0, 1, 0, 1] for scores [0.05, 0.15, 0.6, 0.85]: again positive, negative, positive, negative
    "roc_normal_ich": {"confidenceMetrics": [_point(1.0, 0.0, 0.0), _point(0.85, 0.0, 0.5), _point(0.6, 0.5, 0.5),
                                             _point(0.15, 0.5, 1.0), _point(0.05, 1.0, 1.0)]},
    "roc_blend_sign": {"confidenceMetrics": []},
    "confusion": {"confusionMatrix": {
        "annotationSpecs": [{"displayName": c} for c in CLASSES],
        "rows": [{"row": [1, 1, 0]}, {"row": [1, 1, 0]}, {"row": [0, 0, 0]}]}},
}


def _write_predictions(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(PREDICTIONS), folder / "predictions.parquet")


def test_kfp_classification_views(tmp_path: Path) -> None:
    _write_predictions(tmp_path)
    assert kfp_classification_views(tmp_path) == EXPECTED_VIEWS


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    Image.new("RGB", size, colour).save(path)
    return path.read_bytes()


REPORT_MD = ("# Cross-validated evaluation\n\n2 folds, 4 slices of 2 scans.\n\n| class | auc |\n|---|---:|\n"
             "| non_ich | 0.750 |\n\n![roc](roc.png)\n![confusion](confusion.png)\n")


def _evaluation_folder(folder: Path) -> dict[str, float]:
    """An ``evaluate`` output by hand; returns the ``cv_`` means ``fill_kfp_outputs`` should log."""
    cv = {f"{m}_{c}": (0.5 + 0.01 * i, 0.1) for i, (m, c) in enumerate((m, c) for m in METRICS for c in CLASSES)}
    cv["auc_blend_sign"] = (math.nan, math.nan)  # no blend_sign slice: undefined, not logged
    write_json_atomic(folder / "metrics.json", {
        "per_fold": {0: {k: v[0] for k, v in cv.items()}, 1: {k: v[0] for k, v in cv.items()}},
        "cv": cv, "ci": {k: (v[0] - 0.1, v[0] + 0.1) for k, v in cv.items()}, "scan": {"auc_ich": 0.9}})
    _write_predictions(folder)
    (folder / "report.md").write_text(REPORT_MD)
    _png(folder / "roc.png", (255, 0, 0))
    _png(folder / "confusion.png", (0, 0, 255))
    return {f"cv_{k}": v[0] for k, v in cv.items() if k != "auc_blend_sign"}


def _outputs(folder: Path) -> dict[str, SimpleNamespace]:
    logged: dict[str, float] = {}
    names = ("metrics", "html", "markdown", "roc_non_ich", "roc_normal_ich", "roc_blend_sign", "confusion")
    out = {n: SimpleNamespace(path=str(folder / n / "file"), metadata={}) for n in names}
    out["metrics"].logged = logged
    out["metrics"].log_metric = logged.__setitem__
    return out


def test_fill_kfp_outputs(tmp_path: Path) -> None:
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    expected_metrics = _evaluation_folder(evaluation)
    write_html_report(evaluation / "report.md", evaluation / HTML_REPORT_FILE, "Cross-validated evaluation")
    out = _outputs(tmp_path / "outputs")
    fill_kfp_outputs(evaluation, **out)

    assert out["metrics"].logged == pytest.approx(expected_metrics) and len(expected_metrics) == 11
    assert Path(out["html"].path).read_bytes() == (evaluation / HTML_REPORT_FILE).read_bytes()
    assert Path(out["markdown"].path).read_text() == (
        "# Cross-validated evaluation\n\n2 folds, 4 slices of 2 scans.\n\n| class | auc |\n|---|---:|\n"
        f"| non_ich | 0.750 |\n\n{FIGURES_NOTE}\n")
    for c in CLASSES:
        assert out[f"roc_{c}"].metadata == {**EXPECTED_VIEWS[f"roc_{c}"],
                                            "display_name": f"ROC {c} (one-vs-rest, out-of-fold)"}
    assert out["confusion"].metadata == {**EXPECTED_VIEWS["confusion"],
                                         "display_name": "Confusion matrix (out-of-fold)"}

    # an evaluation from before report.html: rendered from report.md, figures inlined
    (evaluation / HTML_REPORT_FILE).unlink()
    out = _outputs(tmp_path / "outputs2")
    fill_kfp_outputs(evaluation, **out)
    doc = Path(out["html"].path).read_text()
    assert doc == html_report(REPORT_MD, evaluation, "Cross-validated evaluation") and doc.count("data:image/png") == 2


def test_views_are_kfp_own_format_and_fill_real_kfp_artifacts(tmp_path: Path) -> None:
    from kfp import dsl

    roc = dsl.ClassificationMetrics()
    roc.log_roc_curve(fpr=[p["falsePositiveRate"] for p in TINY_ROC], tpr=[p["recall"] for p in TINY_ROC],
                      threshold=[p["confidenceThreshold"] for p in TINY_ROC])
    cm = dsl.ClassificationMetrics()
    cm.log_confusion_matrix(list(CLASSES), [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    assert roc.metadata == EXPECTED_VIEWS["roc_non_ich"] and cm.metadata == EXPECTED_VIEWS["confusion"]

    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    expected_metrics = _evaluation_folder(evaluation)
    out: dict[str, Any] = {"metrics": dsl.Metrics(uri=str(tmp_path / "metrics")),
                           "html": dsl.HTML(uri=str(tmp_path / "html")),
                           "markdown": dsl.Markdown(uri=str(tmp_path / "markdown")),
                           "confusion": dsl.ClassificationMetrics(uri=str(tmp_path / "confusion"))}
    out |= {f"roc_{c}": dsl.ClassificationMetrics(uri=str(tmp_path / f"roc_{c}")) for c in CLASSES}
    fill_kfp_outputs(evaluation, **out)
    assert out["metrics"].metadata == pytest.approx(expected_metrics)
    assert out["roc_normal_ich"].metadata["confidenceMetrics"] == EXPECTED_VIEWS["roc_normal_ich"]["confidenceMetrics"]
    assert (tmp_path / "html").read_text().count("data:image/png;base64,") == 2


def test_report_imports_no_orchestration_tracking_or_torch() -> None:
    heavy = "('kfp', 'mlflow', 'torch')"
    code = f"import sys, blendsign.report; print(sorted(m for m in {heavy} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


