"""Evaluation figures (paper §Evaluation metric, §Error analysis Figure 6, §Visualizing what our model learns Figure 7).

Every function draws one PNG with matplotlib's Agg backend, writes it atomically (a temporary file in the target
folder, then ``os.replace``), closes the figure and returns the path. Class names appear as ``non-ICH``,
``normal ICH`` and ``blend sign``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn.metrics import roc_auc_score, roc_curve

from blendsign import CLASSES
from blendsign.explain import BRAIN_CHANNEL, overlay
from blendsign.storage import atomic_path

__all__ = [
    "DISPLAY",
    "ablation_bars",
    "confusion_grid",
    "confusion_matrix",
    "gradcam_grid",
    "reliability_diagram",
    "roc_curves",
]

DISPLAY: dict[str, str] = {"non_ich": "non-ICH", "normal_ich": "normal ICH", "blend_sign": "blend sign"}
"""Readable class names for figures."""

_COLOURS = ("tab:blue", "tab:orange", "tab:red")  # per class, in CLASSES order
_METRICS = (("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("f1", "F1"), ("auc", "AUC"))
PathLike = str | os.PathLike[str]


def _save(fig: Figure, path: PathLike, *, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (temp file in the same folder, then rename) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _boxes(boxes: Any) -> np.ndarray:
    """``[K, 4]`` or ``[K, 5]`` boxes (None or empty → ``[0, 4]``)."""
    if boxes is None:
        return np.zeros((0, 4))
    b = _np(boxes)
    return np.zeros((0, 4)) if b.size == 0 else b.reshape(-1, b.shape[-1])


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(positive, score)) if positive.any() and (~positive).any() else math.nan


def roc_curves(
    probs: Any,
    labels: Any,
    path: PathLike,
    *,
    title: str = "ROC curves (one-vs-rest)",
    folds: Sequence[tuple[Any, Any]] | None = None,
) -> Path:
    """One-vs-rest ROC curve per class, AUC in the legend (``n/a`` when the class or its complement is absent).

    Args:
        probs: ``[n, 3]`` class probabilities (e.g. the pooled out-of-fold predictions).
        labels: ``[n]`` true class indices.
        path: PNG to write.
        title: figure title.
        folds: optional ``[(probs [n_f, 3], labels [n_f]), ...]`` drawn as thin light curves behind the pooled
            ones; the legend then adds the folds' AUC mean ± SD.
    """
    probs, labels = _np(probs), _np(labels, np.int64)
    fig, ax = plt.subplots(figsize=(5.5, 5.0), layout="constrained")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance")
    for c, name in enumerate(CLASSES):
        colour = _COLOURS[c]
        fold_aucs = []
        for fold_probs, fold_labels in folds or []:
            fp, fl = _np(fold_probs), _np(fold_labels, np.int64) == c
            auc = _auc(fl, fp[:, c])
            if not math.isnan(auc):
                fpr, tpr, _ = roc_curve(fl, fp[:, c])
                ax.plot(fpr, tpr, color=colour, lw=0.7, alpha=0.3)
                fold_aucs.append(auc)
        positive = labels == c
        auc = _auc(positive, probs[:, c])
        text = f"{DISPLAY[name]} (AUC {'n/a' if math.isnan(auc) else f'{auc:.3f}'}"
        if fold_aucs:
            text += f"; folds {np.mean(fold_aucs):.3f} ± {np.std(fold_aucs, ddof=1) if len(fold_aucs) > 1 else 0:.3f}"
        text += ")"
        if math.isnan(auc):
            ax.plot([], [], color=colour, lw=2, label=text)
        else:
            fpr, tpr, _ = roc_curve(positive, probs[:, c])
            ax.plot(fpr, tpr, color=colour, lw=2, label=text)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 − specificity)",
           ylabel="True positive rate (sensitivity)", title=title)  # fmt: skip
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def triage_roc(positive: Any, score: Any, metrics: Mapping[str, Any], path: PathLike) -> Path:
    """Scan-level ROC of ``score [S]`` against ``positive [S]`` with the operating point of ``metrics``
    (:func:`blendsign.triage.triage_metrics`) and the trivial baselines (chance diagonal, flag all / none)."""
    positive, score = _np(positive, bool), _np(score)
    fig, ax = plt.subplots(figsize=(5.0, 5.0), layout="constrained")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="constant score (AUC 0.5)")
    ax.scatter([1, 0], [1, 0], marker="s", color="grey", zorder=3, label="flag every / no scan")
    auc = metrics.get("auc", math.nan)
    if auc is not None and not math.isnan(auc):
        fpr, tpr, _ = roc_curve(positive, score)
        low, high = metrics["auc_ci"]
        ax.plot(fpr, tpr, color=_COLOURS[1], lw=2, label=f"model (AUC {auc:.3f}, 95% CI {low:.3f}–{high:.3f})")
    at = metrics["at_threshold"]
    if not any(math.isnan(at[k]) for k in ("sensitivity", "specificity")):
        ax.scatter([1 - at["specificity"]], [at["sensitivity"]], color="black", zorder=4,
                   label=f"score ≥ {metrics['threshold']:g}")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="False positive rate (1 − specificity)",
           ylabel="True positive rate (sensitivity)",
           title=f"Scan-level triage, any ICH ({int(positive.sum())} of {len(positive)} scans)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _draw_confusion(ax: Any, labels: Any, pred: Any, title: str) -> Any:
    """Figure 6 layout on ``ax``: rows = predicted, columns = true, each column normalised to 1. Returns the image."""
    labels, pred = _np(labels, np.int64), _np(pred, np.int64)
    k = len(CLASSES)
    counts = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k).T  # [pred, true]
    per_true = counts.sum(axis=0, keepdims=True)  # [1, true]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(per_true > 0, counts / np.where(per_true > 0, per_true, 1), np.nan)  # [pred, true]
    cmap = plt.get_cmap("Blues").with_extremes(bad="0.85")  # a class with no true slice: grey column
    image = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=0.0, vmax=1.0)
    for p in range(k):
        for t in range(k):
            if per_true[0, t] == 0:
                text, dark = "n/a", False
            else:
                text, dark = f"{100 * share[p, t]:.0f}%\n({counts[p, t]})", share[p, t] > 0.5
            ax.text(t, p, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    names = [DISPLAY[c] for c in CLASSES]
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names, rotation=90, va="center")
    ax.set(xlabel="True label", ylabel="Predicted label", title=title)
    return image


def confusion_matrix(labels: Any, pred: Any, path: PathLike, *, title: str = "Confusion matrix") -> Path:
    """Confusion matrix as the paper's Figure 6: predicted label on the rows, true label on the columns.

    Each column (true class) sums to 100%; cells show the percentage and the slice count. A class with no true
    slice shows ``n/a``.

    Args:
        labels: ``[n]`` true class indices.
        pred: ``[n]`` predicted class indices.
        path: PNG to write.
        title: panel title.
    """
    fig, ax = plt.subplots(figsize=(4.8, 4.4), layout="constrained")
    image = _draw_confusion(ax, labels, pred, title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return _save(fig, path)


def confusion_grid(panels: Sequence[tuple[str, Any, Any]], path: PathLike, *, title: str | None = None) -> Path:
    """Several confusion matrices side by side (Figure 6 A–C: WCE, WCE+AT, WCE+AT+SKD).

    Args:
        panels: ``[(title, labels [n], pred [n]), ...]``; titles are prefixed ``(A)``, ``(B)``, ...
        path: PNG to write.
        title: optional figure title.
    """
    n = len(panels)
    if n == 0:
        raise ValueError("confusion_grid needs at least one panel")
    fig, axes = plt.subplots(1, n, figsize=(4.3 * n + 0.8, 4.9), squeeze=False, layout="constrained")
    image = None
    for i, (ax, (name, labels, pred)) in enumerate(zip(axes[0], panels, strict=True)):
        image = _draw_confusion(ax, labels, pred, f"({chr(ord('A') + i)}) {name}")
    assert image is not None  # (n ≥ 1 panels)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="share of the true class")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def reliability_diagram(
    calibration: Mapping[str, Mapping[str, Any]], path: PathLike, *, title: str | None = None
) -> Path:
    """One reliability panel per class from :func:`blendsign.metrics.calibration`.

    Bars: observed frequency per equal-width bin; dots: (mean predicted probability, observed frequency) of each
    non-empty bin, annotated with its slice count; diagonal: perfect calibration; ECE in each panel's title.
    """
    names = list(calibration)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.4), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names, strict=True):
        entry = calibration[name]
        acc = np.asarray(entry["bin_accuracy"], dtype=np.float64)
        conf = np.asarray(entry["bin_confidence"], dtype=np.float64)
        count = np.asarray(entry["bin_count"], dtype=np.int64)
        bins = len(count)
        edges = np.linspace(0.0, 1.0, bins + 1)
        filled = count > 0
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfect calibration")
        ax.bar(edges[:-1][filled], acc[filled], width=1.0 / bins, align="edge", color="tab:blue", alpha=0.35,
               edgecolor="tab:blue", label="observed frequency")  # fmt: skip
        ax.plot(conf[filled], acc[filled], "o-", color="tab:blue", ms=4, lw=1)
        for x, y, n in zip(conf[filled], acc[filled], count[filled], strict=True):
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        ece = entry["ece"]
        label = DISPLAY.get(name, name)
        ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="Predicted probability", ylabel="Observed frequency",
               title=f"{label} (ECE {'n/a' if math.isnan(ece) else f'{ece:.3f}'})")  # fmt: skip
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def gradcam_grid(items: Sequence[Mapping[str, Any]], path: PathLike, *, title: str | None = None) -> Path:
    """Slices and their Grad-CAM heat maps as the paper's Figure 7.

    Args:
        items: one column each: ``image`` ``[3, H, W]`` model input, ``cam`` ``[H, W]`` in [0, 1], ``boxes``
            ``[K, 4]`` (or ``[K, 5]`` with a score, as :func:`blendsign.targets.decode_boxes`) predicted xyxy boxes
            in input pixels, possibly empty; optional ``gold`` ``[G, 4]`` the readers' fused boxes in the same
            pixels; ``true`` and ``pred`` class names; ``p`` the predicted class's probability.
        path: PNG to write.
        title: optional figure title.

    Top row: the brain window in grey with the gold boxes (green, dashed) and the detection branch's (red);
    bottom row: the heat map overlay, with its colour bar.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(items)
    if n == 0:
        raise ValueError("gradcam_grid needs at least one item")
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n + 0.8, 7.4), squeeze=False, layout="constrained")
    for i, item in enumerate(items):
        image, cam = _np(item["image"], np.float32), _np(item["cam"], np.float32)
        top, bottom = axes[0, i], axes[1, i]
        top.imshow(np.clip(image[BRAIN_CHANNEL], 0, 1), cmap="gray", vmin=0, vmax=1)
        for box in _boxes(item.get("gold")):
            x0, y0, x1, y1 = box[:4]
            top.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=1.2, ls="--"))
        for box in _boxes(item.get("boxes")):
            x0, y0, x1, y1 = box[:4]
            top.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.5))
            if len(box) > 4:
                top.text(x0, y0, f"{box[4]:.2f}", color="red", fontsize=7, va="bottom")
        true, pred = DISPLAY.get(item["true"], item["true"]), DISPLAY.get(item["pred"], item["pred"])
        verdict = "correct" if item["true"] == item["pred"] else "wrong"
        top.set_title(f"({chr(ord('A') + i)}) true {true}: {verdict}\npred {pred} (p={float(item['p']):.2f})",
                      fontsize=9, color="black" if verdict == "correct" else "firebrick")
        bottom.imshow(overlay(image, cam))
        bottom.set_title(f"({chr(ord('A') + n + i)}) Grad-CAM: {pred}", fontsize=9)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=list(axes[1]), shrink=0.8,
                 label="Grad-CAM (normalised)")
    handles = [Rectangle((0, 0), 1, 1, fill=False, edgecolor="lime", ls="--", label="readers' box"),
               Rectangle((0, 0), 1, 1, fill=False, edgecolor="red", label="detected box (score)")]
    fig.legend(handles=handles, loc="outside upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def ablation_bars(
    table: Mapping[str, Mapping[str, tuple[float, float]]], path: PathLike, *, title: str = "Ablation"
) -> Path:
    """Grouped bars: one panel per class, sensitivity / specificity / F1 / AUC, one bar per setting, SD error bars.

    Args:
        table: ``{setting: {"<metric>_<class>": (mean, sd)}}`` with metric keys as
            :func:`blendsign.metrics.per_class_metrics` (e.g. ``"sensitivity_blend_sign"``); missing or NaN
            entries are left out.
        path: PNG to write.
        title: figure title.
    """
    settings = list(table)
    if not settings:
        raise ValueError("ablation_bars needs at least one setting")
    fig, axes = plt.subplots(
        1, len(CLASSES), figsize=(5.2 * len(CLASSES), 4.4), sharey=True, squeeze=False, layout="constrained"
    )
    width = 0.8 / len(settings)
    x = np.arange(len(_METRICS))
    colours = plt.get_cmap("tab10")
    for ax, name in zip(axes[0], CLASSES, strict=True):
        for s, setting in enumerate(settings):
            pairs = [table[setting].get(f"{metric}_{name}", (math.nan, math.nan)) for metric, _ in _METRICS]
            mean = np.array([p[0] for p in pairs], dtype=np.float64)
            sd = np.nan_to_num(np.array([p[1] for p in pairs], dtype=np.float64))
            ok = ~np.isnan(mean)
            ax.bar(x[ok] + (s - (len(settings) - 1) / 2) * width, mean[ok], width, yerr=sd[ok], capsize=2,
                   color=colours(s % 10), label=setting)  # fmt: skip
        ax.set_xticks(x, [label for _, label in _METRICS], fontsize=9)
        ax.set(ylim=(0, 1.05), title=DISPLAY[name])
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("mean ± SD over folds")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(settings), 6))
    fig.suptitle(title)
    return _save(fig, path)
