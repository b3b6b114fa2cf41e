"""The evaluation report as one self-contained HTML file, and the evaluation as Kubeflow UI views.

Kubeflow's Markdown viewer shows no relative images and truncates at 400,000 characters; its HTML viewer renders
a file in a sandboxed iframe (``srcdoc``), so :func:`html_report` inlines every figure as a ``data:`` URI and uses
no script and no external resource. :func:`kfp_classification_views` turns ``predictions.parquet`` into the
metadata of ``system.ClassificationMetrics`` artifacts (one-vs-rest ROC curves, the confusion matrix), in the
format of kfp's ``log_roc_curve`` and ``log_confusion_matrix``; :func:`fill_kfp_outputs` fills a component's
outputs from an ``evaluate`` folder. No kfp import: the outputs are duck-typed (``.path``, ``.metadata``).
"""

from __future__ import annotations

import base64
import mimetypes
import re
import shutil
from collections.abc import Sequence
from html import escape, unescape
from pathlib import Path
from typing import Any

import markdown as markdown_lib
import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import roc_curve

from blendsign import CLASSES
from blendsign.metrics import confusion as confusion_counts
from blendsign.storage import write_text_atomic

HTML_REPORT_FILE = "report.html"
"""The self-contained HTML report beside ``report.md`` in an ``evaluate`` output."""

FIGURES_NOTE = "The figures (ROC, confusion matrix, calibration, Grad-CAM) are in the HTML report output."
"""Ends the Markdown that Kubeflow's Markdown viewer shows (it cannot show images)."""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; background: #fff;
       max-width: 1150px; margin: 1.5em auto; padding: 0 1em; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
.missing { display: inline-block; border: 1px dashed #a66; background: #fff4f0; color: #733; padding: 0.4em 0.8em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""
_IMG = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
_SRC = re.compile(r"""\bsrc\s*=\s*(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
_IMAGE_LINE = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)\s*$")


def _inline_image(tag: str, folder: Path) -> str:
    """``tag`` with its ``src`` as a ``data:`` URI; a note in its place if the file is not in ``folder``."""
    match = _SRC.search(tag)
    if match is None:
        return tag
    src = unescape(match.group(1) if match.group(1) is not None else match.group(2))
    if src.startswith("data:"):
        return tag
    root = folder.resolve()
    path = (root / src).resolve()
    mime = mimetypes.guess_type(path.name)[0] or ""
    if "://" in src or src.startswith("//") or not path.is_relative_to(root):
        reason = "not embedded (not a file of the report's folder)"
    elif not path.is_file():
        reason = "missing"
    elif not mime.startswith("image/"):
        reason = "not embedded (not an image file)"
    else:
        uri = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
        return tag[: match.start()] + f'src="{uri}"' + tag[match.end():]
    return f'<span class="missing">figure <code>{escape(src)}</code> {reason}</span>'


def html_report(markdown_text: str, folder: Path, title: str) -> str:
    """``markdown_text`` as one HTML document: tables rendered, the images of ``folder`` inlined as ``data:`` URIs,
    inline CSS, no script and no external resource. An image that is not a file of ``folder`` becomes a visible
    note, never a broken link."""
    body = markdown_lib.markdown(markdown_text, extensions=["tables"], output_format="html")
    body = _IMG.sub(lambda m: _inline_image(m.group(0), Path(folder)), body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_html_report(markdown_path: Path, html_path: Path, title: str) -> Path:
    """Render ``markdown_path`` (its images from its own folder) to ``html_path``, replaced in one step."""
    markdown_path = Path(markdown_path)
    write_text_atomic(html_path, html_report(markdown_path.read_text(encoding="utf-8"), markdown_path.parent, title))
    return Path(html_path)


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
