"""The evaluation as Kubeflow UI views.

Kubeflow's Markdown viewer shows no relative images and truncates at 400,000 characters: the component's HTML
output is the self-contained report (:mod:`blendsign.html_report`), its Markdown output the report without its
images. :func:`kfp_classification_views` turns ``predictions.parquet`` into the
metadata of ``system.ClassificationMetrics`` artifacts (one-vs-rest ROC curves, the confusion matrix), in the
format of kfp's ``log_roc_curve`` and ``log_confusion_matrix``; :func:`fill_kfp_outputs` fills a component's
outputs from an ``evaluate`` folder. No kfp import: the outputs are duck-typed (``.path``, ``.metadata``).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import roc_curve

from blendsign import CLASSES
from blendsign.html_report import HTML_REPORT_FILE, html_report
from blendsign.metrics import confusion as confusion_counts
from blendsign.storage import write_text_atomic

FIGURES_NOTE = "The figures (ROC, confusion matrix, calibration, Grad-CAM) are in the HTML report output."
"""Ends the Markdown that Kubeflow's Markdown viewer shows (it cannot show images)."""

_IMAGE_LINE = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)\s*$")


def roc_points(scores: Sequence[float] | np.ndarray, positives: Sequence[bool] | np.ndarray,
               max_points: int = 200) -> list[dict[str, float]]:
    """One-vs-rest ROC as KFP ``confidenceMetrics``: thresholds descending from the (0, 0) end to the (1, 1) end.

    The (0, 0) end has threshold 1.0 (just above the top score if that is 1.0 or more). A longer curve is
    subsampled evenly to ``max_points``, keeping both ends. Without positives or without negatives the curve is
    undefined: ``[]``.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2 (the two ends of the curve), got {max_points}")
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape or scores.ndim != 1:
        raise ValueError(f"scores and positives must be 1-d of one length, got {scores.shape} and {positives.shape}")
    if positives.all() or not positives.any():
        return []
    fpr, tpr, thresholds = roc_curve(positives, scores)
    thresholds[0] = max(1.0, float(np.nextafter(scores.max(), np.inf)))  # sklearn's +inf is not JSON
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(np.int64))
    return [{"confidenceThreshold": float(thresholds[i]), "falsePositiveRate": float(fpr[i]),
             "recall": float(tpr[i])} for i in keep]


def confusion_matrix_metadata(labels: Sequence[str], preds: Sequence[str],
                              classes: Sequence[str] = CLASSES) -> dict[str, Any]:
    """KFP ``confusionMatrix``: counts of class names, rows = true class, columns = predicted, in ``classes`` order."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted((set(labels) | set(preds)) - set(index))
    if unknown:
        raise ValueError(f"labels or predictions outside the classes {list(classes)}: {unknown}")
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    cm = confusion_counts(np.asarray([index[c] for c in labels], dtype=np.int64),
                   np.asarray([index[c] for c in preds], dtype=np.int64), len(classes))
    return {"annotationSpecs": [{"displayName": c} for c in classes],
            "rows": [{"row": [int(v) for v in row]} for row in cm]}


def kfp_classification_views(evaluation_dir: Path) -> dict[str, dict[str, Any]]:
    """``roc_<class>`` (``confidenceMetrics``, one-vs-rest) and ``confusion`` (``confusionMatrix``) metadata of the
    out-of-fold predictions of an ``evaluate`` folder."""
    from blendsign.evaluate import PREDICTIONS_FILE  # the format's owner (imports torch): only when needed

    columns = ["label", "pred", *(f"p_{c}" for c in CLASSES)]
    table = pq.read_table(Path(evaluation_dir) / PREDICTIONS_FILE, columns=columns).to_pydict()
    labels = np.asarray(table["label"], dtype=object)
    views: dict[str, dict[str, Any]] = {
        f"roc_{c}": {"confidenceMetrics": roc_points(table[f"p_{c}"], labels == c)} for c in CLASSES}
    views["confusion"] = {"confusionMatrix": confusion_matrix_metadata(table["label"], table["pred"], CLASSES)}
    return views


def markdown_without_images(markdown_text: str) -> str:
    """``markdown_text`` without its image lines, ending with :data:`FIGURES_NOTE`."""
    lines = [line for line in markdown_text.splitlines() if not _IMAGE_LINE.match(line)]
    return "\n".join(lines).rstrip() + f"\n\n{FIGURES_NOTE}\n"


def fill_kfp_outputs(evaluation_dir: Path, *, metrics: Any, html: Any, markdown: Any, roc_non_ich: Any,
                     roc_normal_ich: Any, roc_blend_sign: Any, confusion: Any) -> None:
    """Fill a Kubeflow component's outputs from an ``evaluate`` folder.

    Args:
        evaluation_dir: the ``evaluate`` output (``metrics.json``, ``predictions.parquet``, ``report.md``,
            ``report.html``; the HTML is rendered anew if absent).
        metrics: ``Metrics``-like (``.log_metric(name, value)``): the finite ``cv_<metric>_<class>`` means.
        html: ``HTML``-like (``.path``): the self-contained report.
        markdown: ``Markdown``-like (``.path``): the report without its images, ending with :data:`FIGURES_NOTE`.
        roc_non_ich, roc_normal_ich, roc_blend_sign: ``ClassificationMetrics``-like (``.metadata``): the class's
            one-vs-rest out-of-fold ROC.
        confusion: ``ClassificationMetrics``-like: the out-of-fold confusion matrix.
    """
    from blendsign.evaluate import REPORT_FILE, EvalResult  # the format's owner (imports torch)

    evaluation_dir = Path(evaluation_dir)
    for name, value in EvalResult.load(evaluation_dir).cv_means().items():
        metrics.log_metric(name, value)
    report_md = (evaluation_dir / REPORT_FILE).read_text(encoding="utf-8")
    report_html = evaluation_dir / HTML_REPORT_FILE
    Path(html.path).parent.mkdir(parents=True, exist_ok=True)
    if report_html.is_file():
        shutil.copyfile(report_html, html.path)
    else:  # an evaluation from before the HTML report
        title = next((line[2:].strip() for line in report_md.splitlines() if line.startswith("# ")), "Evaluation")
        write_text_atomic(html.path, html_report(report_md, evaluation_dir, title))
    write_text_atomic(markdown.path, markdown_without_images(report_md))
    views = kfp_classification_views(evaluation_dir)
    rocs = {"non_ich": roc_non_ich, "normal_ich": roc_normal_ich, "blend_sign": roc_blend_sign}
    for c, artifact in rocs.items():
        artifact.metadata.update(views[f"roc_{c}"])
        artifact.metadata["display_name"] = f"ROC {c} (one-vs-rest, out-of-fold)"
    confusion.metadata.update(views["confusion"])
    confusion.metadata["display_name"] = "Confusion matrix (out-of-fold)"
