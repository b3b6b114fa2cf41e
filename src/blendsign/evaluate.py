"""Cross-validated evaluation of each fold's final model on its held-out fold (paper §Evaluation protocol).

Per class (one-vs-rest, decision rule: argmax): sensitivity, specificity, F1, ROC AUC per fold, then mean
and standard deviation over the K folds; 95% CIs by bootstrap over scans of the pooled out-of-fold
predictions; scan-level triage AUC; calibration; figures (ROC, confusion matrix as the paper's Figure 6,
reliability diagram, Grad-CAM with the detection branch's boxes as its Figure 7).

Output (``OUT``): ``predictions.parquet`` (out-of-fold), ``metrics.json``, ``report.md`` and the PNGs, and
``report.html``: the report with its figures inlined (``blendsign.report``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from blendsign import CLASSES, METRICS, checkpoint, ood
from blendsign.baselines import NAMES as BASELINES
from blendsign.baselines import baseline_table, blood_share, fold_baselines, shortfalls
from blendsign.config import Config
from blendsign.data import (
    SliceDataset,
    SliceIndex,
    collate,
    load_index,
    make_loader,
    read_slice_hu,
    training_data,
)
from blendsign.distill import final_checkpoint, job_dir_name, read_state
from blendsign.engine import predict, resolve_device, softmax
from blendsign.errors import InputError
from blendsign.explain import grad_cam
from blendsign.folds import fold_name
from blendsign.html_report import HTML_REPORT_FILE, write_html_report
from blendsign.metrics import bootstrap_ci, calibration, per_class_metrics, scan_auc
from blendsign.model import load_trained
from blendsign.storage import atomic_path, write_json_atomic, write_text_atomic
from blendsign.targets import decode_boxes
from blendsign.tracking import Tracker, finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path
    per_fold: dict[int, dict[str, float]]
    cv: dict[str, tuple[float, float]]  # "<metric>_<class>" -> (mean, sd) over folds
    ci: dict[str, tuple[float, float]]  # pooled out-of-fold, bootstrap over scans
    scan: dict[str, float]
    figures: tuple[Path, ...] = field(default_factory=tuple)
    baselines: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # name → like ``cv``

    def table(self) -> str:
        """Markdown: rows = classes, columns = metrics as mean ± sd over folds [pooled 95% CI]."""
        lines = ["| class | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
        for c in CLASSES:
            cells = []
            for m in METRICS:
                mean, sd = self.cv[f"{m}_{c}"]
                lo, hi = self.ci.get(f"{m}_{c}", (math.nan, math.nan))
                cells.append(f"{mean:.3f} ± {sd:.3f} [{lo:.3f}, {hi:.3f}]")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    @classmethod
    def load(cls, out_dir: str | Path) -> EvalResult:
        """The result an ``evaluate`` output folder holds (its ``metrics.json``)."""
        m = read_metrics(out_dir)
        return cls(Path(out_dir), {int(k): v for k, v in m["per_fold"].items()},
                   {k: tuple(v) for k, v in m["cv"].items()}, {k: tuple(v) for k, v in m["ci"].items()}, m["scan"],
                   baselines={name: {k: tuple(v) for k, v in b["cv"].items()}
                              for name, b in m.get("baselines", {}).items()})

    def cv_means(self) -> dict[str, float]:
        """``cv_<metric>_<class>`` means over folds, finite ones only (the parent MLflow run's metrics and the
        registry's promotion metrics)."""
        return finite({f"cv_{k}": v[0] for k, v in self.cv.items()})

    def summary(self) -> str:
        return (f"{len(self.per_fold)}-fold cross-validation (mean ± sd over folds [95% CI, bootstrap over scans]):\n"
                f"{self.table()}\nscan level: "
                + ", ".join(f"{k} {v:.3f}" for k, v in self.scan.items()) + f"\nreport: {self.out_dir / REPORT_FILE}")


METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PREDICTIONS_FILE = "predictions.parquet"


def read_metrics(out_dir: str | Path) -> dict[str, Any]:
    """``metrics.json`` of an ``evaluate`` output, undefined values (JSON null) back to NaN."""
    m = json.loads((Path(out_dir) / METRICS_FILE).read_text())

    def nan(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: nan(x) for k, x in v.items()}
        if isinstance(v, list):
            return [nan(x) for x in v]
        return math.nan if v is None else v

    return {k: nan(v) if k in ("per_fold", "cv", "ci", "scan", "baselines") else v for k, v in m.items()}


def _features(index: SliceIndex, desc: str, progress: bool) -> dict[str, float]:
    """:func:`blendsign.baselines.blood_share` of every slice of ``index``, by ``instance_key``."""
    from blendsign.progress import progress as progress_bar

    out = {}
    for i in progress_bar(range(len(index)), desc=desc, unit="slice", enabled=progress):
        hu = read_slice_hu(index.file[i], int(index.row_group[i]), int(index.offset[i]), int(index.rows[i]),
                           int(index.cols[i]))
        out[index.instance_key[i]] = blood_share(hu)
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(arr) == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _cam_candidates(probs: np.ndarray, labels: np.ndarray, per_class: int) -> list[tuple[int, bool]]:
    """Per class, the most confident correct and the most confident wrong predictions: (row, correct)."""
    pred = probs.argmax(1)
    picks: list[tuple[int, bool]] = []
    for c in range(len(CLASSES)):
        for correct in (True, False):
            rows = np.flatnonzero((labels == c) & ((pred == c) == correct))
            rows = rows[np.argsort(-probs[rows, pred[rows]], kind="stable")][:per_class]
            picks += [(int(r), correct) for r in rows]
    return picks


def figure_picks(cams: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` Grad-CAM examples (``class``, ``correct``, ``p`` each) covering every class: per class its most
    confident correct and its most confident wrong one, class by class (as the paper's Figure 7), then the next
    most confident of each kind in the same order while fewer than ``n``."""
    groups: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for item in sorted(cams, key=lambda d: -d["p"]):
        groups.setdefault((item["class"], item["correct"]), []).append(item)
    order = [(c, correct) for c in range(len(CLASSES)) for correct in (True, False)]
    out: list[dict[str, Any]] = []
    for rank in range(max((len(g) for g in groups.values()), default=0)):
        out += [groups[key][rank] for key in order if rank < len(groups.get(key, []))]
    return out[:n]


def evaluate(
    cfg: Config,
    *,
    ingest_dir: str | Path,
    labels_dir: str | Path,
    folds_dir: str | Path,
    models_dir: str | Path,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    run_id: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``models_dir/fold<k>`` (distillation outputs) on their held-out folds; log to ``run_id``."""
    from blendsign import plots  # matplotlib only when figures are made

    out_dir, models_dir = Path(out_dir), Path(models_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    everything = load_index(ingest_dir, labels_dir, folds_dir)
    folds = sorted(set(everything.fold.tolist()))
    feature = _features(everything, "baseline features", progress)
    base_fold: dict[str, dict[int, dict[str, float]]] = {name: {} for name in BASELINES}
    ood_flagged: dict[int, float] = {}  # share of held-out slices the fold model calls out of distribution
    rows: dict[str, list[Any]] = {k: [] for k in ("scan_id", "slice_index", "instance_key", "fold", "label")}
    probs_all, per_fold, roc_folds, cams = [], {}, [], []
    fold_runs: dict[int, str | None] = {}
    for k in folds:
        fold_dir = models_dir / job_dir_name(k)
        path = final_checkpoint(fold_dir)
        model, trained, ood_state = load_trained(path, device)  # preprocessing as it was trained
        fold_runs[k] = read_state(fold_dir).get("fold_run_id")
        train_index, val, digest = training_data(trained, ingest_dir, labels_dir, folds_dir, k)
        if checkpoint.trained_on(path).get("data") != digest:
            raise InputError(f"the fold {k} model {path} was not trained on fold {k}'s training slices of "
                             f"these ingest, labels and folds folders: scoring it here could score slices it "
                             "trained on. Evaluate with the folders it was trained with, or train anew.")
        assert val is not None
        ds = SliceDataset(val, trained.data, stride=model.stride, min_overlap=trained.loss.gaussian_min_overlap,
                          augment=False)
        loader = make_loader(ds, batch_size=cfg.train.batch_size, shuffle=False, workers=cfg.data.workers,
                             device=device)
        pred = predict(model, loader, device=device, desc=f"evaluate fold {k}", progress=progress,
                       stats=ood_state is not None)
        order = np.argsort(pred["index"])
        probs, labels = softmax(pred["logits"][order]), pred["labels"][order]
        per_fold[k] = per_class_metrics(probs, labels)
        if ood_state is not None:
            flags = ood.score(ood_state, [torch.from_numpy(s) for s in pred["stats"]]) > 1.0
            ood_flagged[k] = float(flags.float().mean())
        for name, base in fold_baselines(np.array([feature[key] for key in train_index.instance_key]),
                                         train_index.label, np.array([feature[key] for key in val.instance_key])
                                         ).items():
            base_fold[name][k] = per_class_metrics(base, labels)
        roc_folds.append((probs, labels))
        probs_all.append(probs)
        rows["scan_id"] += list(val.scan_id)
        rows["slice_index"] += val.slice_index.tolist()
        rows["instance_key"] += list(val.instance_key)
        rows["fold"] += [k] * len(val)
        rows["label"] += labels.tolist()
        for i, correct in _cam_candidates(probs, labels, cfg.eval.gradcam_per_class):
            sample = loader.prepare(collate([ds[i]]), device)  # the held-out slice as it was scored
            image = sample["image"][0]
            cam = grad_cam(model, image, target_class=int(probs[i].argmax()))[0].cpu()
            with torch.no_grad():
                det = model(image[None])["det"][0].float().cpu()
            boxes = decode_boxes(det, stride=model.stride)[:, :4]
            cams.append({"image": image.cpu(), "cam": cam, "boxes": boxes, "gold": sample["boxes"][0],
                         "true": CLASSES[labels[i]], "pred": CLASSES[int(probs[i].argmax())],
                         "p": float(probs[i].max()), "correct": correct, "class": int(labels[i])})

    probs = np.concatenate(probs_all)
    labels = np.asarray(rows["label"], dtype=np.int64)
    groups = np.asarray(rows["scan_id"])
    keys = ["accuracy", *(f"{m}_{c}" for m in METRICS for c in CLASSES)]
    cv = {key: _mean_sd([per_fold[k][key] for k in folds]) for key in keys}
    base_cv = {name: {key: _mean_sd([base_fold[name][k][key] for k in folds]) for key in keys}
               for name in BASELINES}
    warnings = shortfalls(cv, base_cv, cfg.eval.baseline_margin)
    beaten = [key for key in ("accuracy", *(f"auc_{c}" for c in CLASSES)) if base_cv["hu_rule"][key][0] > cv[key][0]]
    for text in warnings:
        log.warning("the model is no better than a trivial one: %s", text)
    ci = bootstrap_ci(probs, labels, groups, n_boot=cfg.eval.bootstrap, seed=cfg.train.seed)
    scan = scan_auc(probs, labels, groups)
    cal = calibration(probs, labels, bins=cfg.eval.calibration_bins)

    table = pa.table({**rows, "label": [CLASSES[c] for c in labels], "pred": [CLASSES[c] for c in probs.argmax(1)],
                      **{f"p_{c}": probs[:, j] for j, c in enumerate(CLASSES)}})
    with atomic_path(out_dir / PREDICTIONS_FILE) as tmp:
        pq.write_table(table, tmp)
    pred_all = probs.argmax(1)
    figures = (
        plots.roc_curves(probs, labels, out_dir / "roc.png", title="ROC, out-of-fold (light: per fold)",
                         folds=roc_folds),
        plots.confusion_matrix(labels, pred_all, out_dir / "confusion.png",
                               title="Confusion, normalised by true class"),
        plots.reliability_diagram(cal, out_dir / "calibration.png"),
        plots.gradcam_grid(figure_picks(cams, 2 * len(CLASSES)), out_dir / "gradcam.png",
                           title="Grad-CAM (bottom) and detection boxes (top): a correct and a wrong example per "
                                 "class, the most confident of each"),
    )
    metrics = {"per_fold": per_fold, "cv": cv, "ci": ci, "scan": scan,
               "ece": {c: cal[c]["ece"] for c in CLASSES}, "decision_rule": "argmax",
               "slices": len(labels), "scans": len(set(rows["scan_id"])),
               "baselines": {name: {"per_fold": base_fold[name], "cv": base_cv[name]} for name in BASELINES},
               "ood_flagged": ood_flagged}
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    result = EvalResult(out_dir, per_fold, cv, ci, scan, figures, base_cv)
    report = ["# Cross-validated evaluation", "", f"{len(folds)} folds, {len(labels)} slices of "
              f"{metrics['scans']} scans; decision rule: argmax of the class probabilities.", "",
              "Per class, one-vs-rest: mean ± sd over folds [95% CI, bootstrap over scans, pooled out-of-fold].",
              "The mean is over the folds' own values (the paper's protocol); the CI is of all out-of-fold "
              "predictions pooled, which ranks across folds too, so the mean can fall outside it when folds "
              "disagree in calibration.",
              "", result.table(), "",
              "Against trivial baselines on the same held-out folds (mean over folds): `prior` gives every slice the "
              "training folds' class shares (no skill: AUC 0.5, accuracy of always answering the majority class); "
              "`hu_rule` is a logistic regression on one number per slice, the share of intracranial pixels "
              "(0–100 HU) in the acute-blood range (50–90 HU).", "", baseline_table(cv, base_cv), "",
              *([f"**Warning: this model is no better than a trivial one**: {'; '.join(warnings)}.", ""]
                if warnings else []),
              *([f"The one-feature HU rule beats the model on {', '.join(beaten)}.", ""] if beaten else []),
              "Scan level (most suspicious slice per scan): "
              + ", ".join(f"{k} {v:.3f}" for k, v in scan.items()), "",
              "Expected calibration error: " + ", ".join(f"{c} {cal[c]['ece']:.3f}" for c in CLASSES), "",
              *([f"Out-of-distribution flag (Mahalanobis distances of every stage's feature statistics; threshold: the "
                 f"{ood.QUANTILE:g} quantile of held-out training slices): held-out slices flagged per fold "
                 + ", ".join(f"{k} {v:.1%}" for k, v in ood_flagged.items()) + ".", ""] if ood_flagged else []),
              *[f"![{p.stem}]({p.name})" for p in figures], ""]
    write_text_atomic(out_dir / REPORT_FILE, "\n".join(report))
    # the same report with its figures inlined: Kubeflow's HTML viewer shows no relative images
    write_html_report(out_dir / REPORT_FILE, out_dir / HTML_REPORT_FILE, title="Cross-validated evaluation")
    if tracker is not None:
        for k, run in fold_runs.items():
            if run:
                with tracker.run(fold_name(k), run_id=run) as r:
                    r.log_metrics(finite(per_fold[k]))
        if run_id:
            with tracker.run("evaluate", run_id=run_id) as r:
                flat = {f"cv_{key}": v[0] for key, v in cv.items()} | {f"cv_{key}_sd": v[1] for key, v in cv.items()}
                flat |= {f"ci_low_{key}": v[0] for key, v in ci.items()}
                flat |= {f"ci_high_{key}": v[1] for key, v in ci.items()}
                flat |= {f"scan_{key}": v for key, v in scan.items()} | {f"ece_{c}": cal[c]["ece"] for c in CLASSES}
                flat |= {f"baseline_{name}_cv_{key}": v[0] for name, b in base_cv.items() for key, v in b.items()}
                if ood_flagged:
                    flat["ood_flagged_share"] = float(np.mean(list(ood_flagged.values())))
                r.log_metrics(finite(flat))
                files = (REPORT_FILE, HTML_REPORT_FILE, METRICS_FILE, PREDICTIONS_FILE)
                for path in (*figures, *(out_dir / f for f in files)):
                    r.log_artifact(path, "evaluation")
    return result
