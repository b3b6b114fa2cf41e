"""K-fold cross-validation of the whole method, and the paper's ablation (Table 3, Figure 6).

``cross_validate``: for every fold, teacher + distillation rounds, then evaluation, under one parent MLflow
run. ``ablation``: the same folds for WCE, WCE + AT (detection) and WCE + AT + SKD (distillation); the
WCE + AT teacher is reused as round 0 of the SKD setting (same training config ⇒ the finished run is found).
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from blendsign import CLASSES
from blendsign.config import Config, override
from blendsign.data import load_index
from blendsign.distill import distill
from blendsign.evaluate import METRICS, PREDICTIONS_FILE, EvalResult, evaluate
from blendsign.storage import write_json_atomic, write_text_atomic
from blendsign.tracking import Tracker

log = logging.getLogger(__name__)

# name → (loss overrides, distillation rounds or None for the config's)
SETTINGS: dict[str, tuple[dict[str, bool], int | None]] = {
    "WCE": ({"use_det": False}, 0),
    "WCE+AT": ({"use_det": True}, 0),
    "WCE+AT+SKD": ({"use_det": True}, None),
}

ABLATION, ABLATION_MD = "ablation.json", "ablation.md"  # Table 3 as data and as a report


def cross_validate(
    cfg: Config,
    *,
    ingest_dir: str | Path,
    labels_dir: str | Path,
    folds_dir: str | Path,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    run_name: str = "cross-validation",
    progress: bool = True,
) -> EvalResult:
    """Distil every fold (``out/models/fold<k>``), then evaluate them (``out/evaluation``)."""
    out_dir = Path(out_dir)
    folds = sorted(set(load_index(ingest_dir, labels_dir, folds_dir).fold.tolist()))
    with ExitStack() as stack:
        run = stack.enter_context(tracker.run(run_name, tags={"stage": "cross-validation", "preset": cfg.preset},
                                              parent_run_id=parent_run_id)) if tracker else None
        if run is not None:
            run.log_params(cfg.flat())
        for k in folds:
            result = distill(cfg, ingest_dir=ingest_dir, labels_dir=labels_dir, folds_dir=folds_dir, fold=k,
                             out_dir=out_dir / "models", tracker=tracker,
                             parent_run_id=run.run_id if run else None, progress=progress)
            log.info("%s", result.summary())
        evaluation = evaluate(cfg, ingest_dir=ingest_dir, labels_dir=labels_dir, folds_dir=folds_dir,
                              models_dir=out_dir / "models", out_dir=out_dir / "evaluation", tracker=tracker,
                              run_id=run.run_id if run else None, progress=progress)
    return evaluation


@dataclass(frozen=True)
class AblationResult:
    out_dir: Path
    settings: dict[str, EvalResult]

    def table(self) -> str:
        """Markdown like the paper's Table 3: rows = setting × class, mean ± sd over folds."""
        lines = ["| setting | class | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
        for name, res in self.settings.items():
            for c in CLASSES:
                cells = [f"{res.cv[f'{m}_{c}'][0]:.3f} ± {res.cv[f'{m}_{c}'][1]:.3f}" for m in METRICS]
                lines.append(f"| {name} | {c} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        return f"ablation over {len(self.settings)} settings:\n{self.table()}\nreport: {self.out_dir / 'ablation.md'}"


def ablation(
    cfg: Config,
    *,
    ingest_dir: str | Path,
    labels_dir: str | Path,
    folds_dir: str | Path,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> AblationResult:
    """Cross-validate each of ``SETTINGS`` on the same folds; write ``ablation.md`` and ``ablation.png``."""
    from blendsign import plots

    out_dir = Path(out_dir)
    results: dict[str, EvalResult] = {}
    with ExitStack() as stack:
        run = stack.enter_context(tracker.run("ablation", tags={"stage": "ablation", "preset": cfg.preset,
                                                                "label_noise": cfg.train.label_noise})) \
            if tracker else None
        for name, (loss, rounds) in SETTINGS.items():
            setting = override(cfg, loss=loss, distill={} if rounds is None else {"rounds": rounds})
            folder = out_dir / name
            if name == "WCE+AT+SKD":
                _reuse_teachers(out_dir / "WCE+AT" / "models", folder / "models")
            results[name] = cross_validate(setting, ingest_dir=ingest_dir, labels_dir=labels_dir,
                                           folds_dir=folds_dir, out_dir=folder, tracker=tracker,
                                           parent_run_id=run.run_id if run else None, run_name=name,
                                           progress=progress)
        result = AblationResult(out_dir, results)
        table = {name: {f"{m}_{c}": res.cv[f"{m}_{c}"] for m in METRICS for c in CLASSES}
                 for name, res in results.items()}
        figures = [plots.ablation_bars(table, out_dir / "ablation.png")]
        grid = []
        for name in results:
            pred = pq.read_table(out_dir / name / "evaluation" / PREDICTIONS_FILE, columns=["label", "pred"])
            grid.append((name, [CLASSES.index(v) for v in pred.column("label").to_pylist()],
                         [CLASSES.index(v) for v in pred.column("pred").to_pylist()]))
        figures.append(plots.confusion_grid(grid, out_dir / "ablation_confusion.png"))
        md = ["# Ablation (paper Table 3 and Figure 6)", "",
              f"Preset `{cfg.preset}`, {cfg.folds.k}-fold cross-validation, injected label noise "
              f"{cfg.train.label_noise:.0%} of training blend-sign slices relabelled normal ICH; "
              "mean ± sd over folds, decision rule argmax.", "", result.table(), "",
              "![ablation](ablation.png)", "", "![confusion matrices](ablation_confusion.png)", ""]
        write_text_atomic(out_dir / ABLATION_MD, "\n".join(md))
        write_json_atomic(out_dir / ABLATION, table)
        if run is not None:
            for path in (*figures, out_dir / ABLATION_MD, out_dir / ABLATION):
                run.log_artifact(path, "ablation")
    return result


def _reuse_teachers(source: Path, target: Path) -> None:
    """Link the WCE + AT teachers as round 0 of the SKD setting, so they are not trained twice."""
    for fold_dir in sorted(source.glob("fold*")):
        dest = target / fold_dir.name / "round0"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(fold_dir / "round0", dest.parent), dest)
