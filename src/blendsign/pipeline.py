"""Stage runners that add MLflow tracking to the library stages, and the whole job on one machine.

Each ``*_stage`` function runs one library stage and logs it as a run nested under the pipeline's parent
run (params = the stage's config section, metrics, reports and plots as artifacts, tags: git commit,
data fingerprint, preset). The Kubeflow components call these same functions; ``run_pipeline`` chains
them locally: ingest → fuse → folds → cross-validation (teacher + distillation per fold, evaluation) →
register, and writes ``.blendsign/last_run.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blendsign.config import Config
from blendsign.folds import FoldsResult, make_folds
from blendsign.ingest import IngestResult, ingest
from blendsign.labels import FuseResult, fuse
from blendsign.storage import write_json_atomic, write_text_atomic
from blendsign.tracking import LOCAL_DIR, Tracker, finite, git_commit, ui_command

if TYPE_CHECKING:  # torch and scikit-learn: not imported by the light pipeline steps
    from blendsign.evaluate import EvalResult

log = logging.getLogger(__name__)


def data_fingerprint(ingest_dir: str | Path) -> str:
    """The ingested dataset's fingerprint (hash of its manifest)."""
    return json.loads((Path(ingest_dir) / "manifest.json").read_text())["dataset_fingerprint"]


def ingest_stage(cfg: Config, source: str | Path, out: str | Path, *, clinical: str | Path | None = None,
                 tracker: Tracker | None = None, parent_run_id: str | None = None,
                 progress: bool = True) -> IngestResult:
    result = ingest(source, out, cfg.ingest, clinical_csv=clinical, progress=progress)
    if tracker is not None:
        r = result.report
        with tracker.run("ingest", parent_run_id=parent_run_id, tags=_tags(cfg, result.out)) as run:
            run.log_params({f"ingest.{k}": v for k, v in r["config"].items()})
            run.log_metrics({"studies_found": r["studies_found"], "scans_written": r["scans_written"],
                             "slices_written": r["slices_written"], "quarantined": len(r["quarantined"]),
                             "duplicates": len(r["duplicates"]),
                             **{f"excluded_{k}": v for k, v in r["excluded"].items()}})
            for name in ("ingest_report.json", "ingest_report.md"):
                run.log_artifact(result.out / name, "ingest")
    return result


def fuse_stage(cfg: Config, annotations: str | Path, ingest_dir: str | Path, out: str | Path, *,
               tracker: Tracker | None = None, parent_run_id: str | None = None) -> FuseResult:
    result = fuse(annotations, ingest_dir, out, cfg.labels)
    if tracker is not None:
        with tracker.run("fuse", parent_run_id=parent_run_id, tags=_tags(cfg, ingest_dir)) as run:
            run.log_params({f"labels.{k}": v for k, v in cfg.to_dict()["labels"].items()})
            run.log_metrics(finite({**{f"kappa_{k}": v for k, v in result.kappa.items() if v is not None},
                                    **{f"slices_{k}": v for k, v in result.gold_counts.items()},
                                    "contested": result.contested, "unmatched_annotation_rows": result.unmatched_rows}))
            for name in ("agreement.json", "agreement.md"):
                run.log_artifact(Path(out) / name, "fuse")
    return result


def folds_stage(cfg: Config, labels_dir: str | Path, out: str | Path, *, ingest_dir: str | Path | None = None,
                tracker: Tracker | None = None, parent_run_id: str | None = None) -> FoldsResult:
    result = make_folds(labels_dir, out, cfg.folds)
    if tracker is not None:
        with tracker.run("folds", parent_run_id=parent_run_id, tags=_tags(cfg, ingest_dir)) as run:
            run.log_params({f"folds.{k}": v for k, v in cfg.to_dict()["folds"].items()})
            run.log_metrics({"patients": result.patients, "scans": result.scans})
            for name in ("folds.md", "folds.json"):
                run.log_artifact(Path(out) / name, "folds")
    return result


def register_stage(
    cfg: Config,
    *,
    cv_dir: str | Path,
    ingest_dir: str | Path,
    labels_dir: str | Path,
    folds_dir: str | Path,
    out_dir: str | Path,
    tracker: Tracker,
    parent_run_id: str | None = None,
    mode: str = "refit",
    name: str = "blendsign",
    metric: str = "cv_auc_blend_sign",
    margin: float = 0.0,
    trained: Sequence[str | Path] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Register the model chosen from the cross-validated output, gated on ``metric`` (see registry.py).

    ``mode="refit"`` (default): teacher + distillation rounds on every non-excluded scan, carrying the CV
    metrics as its expected performance; trained here unless one of the ``trained`` distill outputs holds it
    (``all/``: the Kubeflow pipeline trains it beside the folds), then copied to ``out_dir/all``.
    ``mode="fold-ensemble"``: the K fold models as one model averaging their probabilities.
    """
    from blendsign.distill import distill, final_checkpoint
    from blendsign.orchestration import gather_fold_models, read_metrics
    from blendsign.registry import check_promotion_metric, model_card, register_version
    from blendsign.serving import log_model

    cv_dir, out_dir = Path(cv_dir), Path(out_dir)
    metrics = read_metrics(cv_dir / "evaluation")
    value = metrics["cv"][check_promotion_metric(metric).removeprefix("cv_")][0]
    if mode == "refit" and any((Path(t) / "all" / "distill.json").exists() for t in trained):
        checkpoints = [final_checkpoint(gather_fold_models(trained, out_dir, pattern="all") / "all")]
    elif mode == "refit":
        refit = distill(cfg, ingest_dir=ingest_dir, labels_dir=labels_dir, folds_dir=None, fold=None,
                        out_dir=out_dir, tracker=tracker, parent_run_id=parent_run_id, progress=progress)
        checkpoints = [refit.final.checkpoint]
    elif mode == "fold-ensemble":
        checkpoints = [final_checkpoint(p) for p in sorted((cv_dir / "models").glob("fold*"))]
    else:
        raise ValueError(f"register mode must be 'refit' or 'fold-ensemble', got {mode!r}")
    fingerprint, commit = data_fingerprint(ingest_dir), git_commit()
    tags = {"data_fingerprint": fingerprint, "git_commit": commit, "preset": cfg.preset, "register_mode": mode,
            **{f"cv_{k}": f"{v[0]:.6f}" for k, v in metrics["cv"].items() if v[0] == v[0]}}
    with tracker.run("register", parent_run_id=parent_run_id, tags={**_tags(cfg, ingest_dir), "stage": "register"}) \
            as run:
        run.log_params({"register.mode": mode, "register.metric": metric, "register.margin": margin,
                        "register.name": name, "register.checkpoints": len(checkpoints)})
        model_uri = log_model(run_id=run.run_id, tracking_uri=tracker.uri, checkpoints=checkpoints,
                              registered_model_name=name)
        ingest_report = json.loads((Path(ingest_dir) / "ingest_report.json").read_text())
        agreement = json.loads((Path(labels_dir) / "agreement.json").read_text())
        version, promotion = register_version(
            tracker.client, name=name, run_id=run.run_id, metric=metric, value=value, margin=margin, tags=tags,
            card="(model card follows)")
        reproduce = (f"blendsign run --source DICOM --annotations CSV --config {cfg.preset} --register {mode} "
                     f"--metric {metric} --margin {margin:g}")  # no paths: folder names may identify patients
        card = model_card(name=name, version=version, mode=mode, preset=cfg.preset, metrics=metrics,
                          agreement=agreement, ingest=ingest_report, fingerprint=fingerprint, commit=commit,
                          promotion=promotion, command=reproduce)
        tracker.client.update_model_version(name, version, description=card)
        write_text_atomic(out_dir / "model_card.md", card)
        run.log_artifact(out_dir / "model_card.md", "registry")
        run.log_metrics({metric: value, "promoted": float(promotion.promoted)})
    alias = "champion" if promotion.promoted else "challenger"
    return {"registered_model": name, "model_version": version, "alias": alias, "promoted": promotion.promoted,
            "decision": promotion.text, "model_uri": f"models:/{name}@champion", "version_uri": model_uri}


def _tags(cfg: Config, ingest_dir: str | Path | None) -> dict[str, str]:
    tags = {"preset": cfg.preset}
    if ingest_dir is not None and (Path(ingest_dir) / "manifest.json").exists():
        tags["data_fingerprint"] = data_fingerprint(ingest_dir)
    return tags


@dataclass(frozen=True)
class PipelineResult:
    work_dir: Path
    evaluation: EvalResult
    last_run: dict[str, Any]

    def summary(self) -> str:
        lr = self.last_run
        return "\n".join([
            f"pipeline finished: work folder {self.work_dir}",
            f"registered {lr['registered_model']} v{lr['model_version']} as {lr['alias']}: {lr['decision']}",
            f"champion: {lr['model_uri']}",
            "", self.evaluation.summary(), "",
            f"MLflow: {lr['tracking_uri']} (experiment {lr['experiment']}, parent run {lr['parent_run_id']}); "
            f"UI: {ui_command(lr['tracking_uri'])}",
            f"run record: {LOCAL_DIR / 'last_run.json'}",
        ])


def check_run_inputs(source: object, annotations: object, metric: str) -> None:
    """What a whole run (here or on Kubeflow) refuses before any work: a source without its annotations (or
    the reverse), and a promotion metric that would only fail at registration, after hours of training."""
    from blendsign.registry import check_promotion_metric

    if (annotations is None) != (source is None):
        raise ValueError("give a DICOM source and its annotations together, or neither (the synthetic cohort)")
    check_promotion_metric(metric)


def run_pipeline(
    cfg: Config,
    *,
    work_dir: str | Path,
    source: str | Path | None = None,
    annotations: str | Path | None = None,
    clinical: str | Path | None = None,
    tracker: Tracker,
    register_mode: str = "refit",
    model_name: str = "blendsign",
    metric: str = "cv_auc_blend_sign",
    margin: float = 0.0,
    progress: bool = True,
) -> PipelineResult:
    """The main job: every stage on this machine under one parent MLflow run (synthetic cohort by default)."""
    from blendsign.cv import cross_validate
    from blendsign.synth import synthesize

    check_run_inputs(source, annotations, metric)
    work = Path(work_dir)
    if source is None:
        synth = synthesize(work / "source", cfg.synth, progress=progress)
        log.info("%s", synth.summary())
        source, annotations, clinical = work / "source" / "dicom", work / "source" / "annotations.csv", None
    with tracker.run("pipeline", tags={"stage": "pipeline", "preset": cfg.preset}) as parent:
        parent.log_params(cfg.flat())
        ing = ingest_stage(cfg, source, work / "ingest", clinical=clinical, tracker=tracker,
                           parent_run_id=parent.run_id, progress=progress)
        log.info("%s", ing.summary())
        parent.set_tags({"data_fingerprint": data_fingerprint(work / "ingest")})
        fused = fuse_stage(cfg, annotations, work / "ingest", work / "labels", tracker=tracker,
                           parent_run_id=parent.run_id)
        log.info("%s", fused.summary())
        folds = folds_stage(cfg, work / "labels", work / "folds", ingest_dir=work / "ingest", tracker=tracker,
                            parent_run_id=parent.run_id)
        log.info("%s", folds.summary())
        dirs = {"ingest_dir": work / "ingest", "labels_dir": work / "labels", "folds_dir": work / "folds"}
        evaluation = cross_validate(cfg, **dirs, out_dir=work / "cv", tracker=tracker,
                                    parent_run_id=parent.run_id, progress=progress)
        registered = register_stage(cfg, cv_dir=work / "cv", **dirs, out_dir=work / "register", tracker=tracker,
                                    parent_run_id=parent.run_id, mode=register_mode, name=model_name,
                                    metric=metric, margin=margin, progress=progress)
        parent.log_metrics({f"cv_{k}": v[0] for k, v in evaluation.cv.items() if v[0] == v[0]})
    last_run = {"tracking_uri": tracker.uri, "experiment": tracker.experiment_name,
                "parent_run_id": parent.run_id, **registered}
    write_json_atomic(LOCAL_DIR / "last_run.json", last_run)
    return PipelineResult(work, evaluation, last_run)
