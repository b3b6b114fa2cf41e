"""What the Kubeflow components need besides the stage functions: steps in separate pods sharing one parent
MLflow run, the fold list, fold models gathered for evaluation, and the run record.

``blendsign.pipeline.run_pipeline`` keeps its parent run open in one process; in Kubeflow every step is a
pod, so the parent run (``pipeline``) and its ``cross-validation`` child are opened by one step
(:func:`open_pipeline_run`), handed downstream as a small JSON artifact (:class:`RunRef`), and closed by
the last step (:func:`finish_pipeline_run` or :func:`end_skipped_run`). The MLflow tree is the same as
``run_pipeline``'s: fold and round runs under ``cross-validation``, ``refit`` and ``register`` under
``pipeline``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from blendsign.config import Config, load_preset, override
from blendsign.storage import atomic_path, write_json_atomic
from blendsign.tracking import Run, Tracker, finite, git_commit

log = logging.getLogger(__name__)


def pipeline_config(preset: str, *, k: int | None = None, rounds: int | None = None) -> Config:
    """The preset with the pipeline's parameters applied; ``k`` ≤ 0, ``rounds`` < 0 or ``None``: the preset's."""
    cfg = load_preset(preset)
    return override(cfg, folds={"k": k} if k is not None and k > 0 else {},
                    distill={"rounds": rounds} if rounds is not None and rounds >= 0 else {})


@dataclass(frozen=True)
class RunRef:
    """Where a pipeline run logs: the MLflow store, experiment, parent run and cross-validation run."""

    tracking_uri: str
    experiment: str
    parent_run_id: str
    cv_run_id: str

    def tracker(self) -> Tracker:
        return Tracker.open(self.experiment, uri=self.tracking_uri)

    @contextmanager
    def step(self, name: str) -> Iterator[Tracker]:
        """A pipeline step logging under this run: if it raises, the parent run is marked FAILED with a
        ``failed_step`` tag before the error propagates, so a Kubeflow run that stops there does not leave a
        parent run RUNNING for ever (a retried step that then succeeds is overruled by the final
        ``finish_pipeline_run``, which ends it FINISHED)."""
        tracker = self.tracker()
        try:
            yield tracker
        except BaseException as exc:
            tracker.client.set_tag(self.parent_run_id, "failed_step", f"{name}: {type(exc).__name__}")
            tracker.client.update_run(self.parent_run_id, status="FAILED")
            raise

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> RunRef:
        return cls(**json.loads(Path(path).read_text()))


def open_pipeline_run(cfg: Config, *, ingest_dir: str | Path, tracking_uri: str | None, experiment: str,
                      tags: Mapping[str, str] | None = None) -> RunRef:
    """Open the parent run ``pipeline`` and its child ``cross-validation`` (both left RUNNING)."""
    from blendsign.pipeline import data_fingerprint

    tracker = Tracker.open(experiment, uri=tracking_uri or None)
    common = {"git_commit": git_commit(), "preset": cfg.preset, "data_fingerprint": data_fingerprint(ingest_dir),
              "orchestrator": "kubeflow"}
    parent = tracker.client.create_run(tracker.experiment_id, run_name="pipeline",
                                       tags={**common, "stage": "pipeline", **(tags or {})})
    Run(tracker.client, parent.info.run_id).log_params(cfg.flat())
    cv = tracker.client.create_run(tracker.experiment_id, run_name="cross-validation",
                                   tags={**common, "stage": "cross-validation",
                                         "mlflow.parentRunId": parent.info.run_id})
    Run(tracker.client, cv.info.run_id).log_params(cfg.flat())
    ref = RunRef(tracker.uri, experiment, parent.info.run_id, cv.info.run_id)
    log.info("MLflow parent run %s (cross-validation %s) in %s", ref.parent_run_id, ref.cv_run_id, tracker.uri)
    return ref


def require_pseudonym_key(output_uri: str) -> None:
    """On a cluster (an artifact URI such as ``s3://…`` or ``minio://…``) the pseudonym key must come from
    ``BLENDSIGN_PSEUDONYM_KEY``: a key file written beside a pod's output is never uploaded, so ``fuse`` could
    not map the annotations and every run would get new pseudonyms (a new dataset fingerprint)."""
    from blendsign.deid import KEY_ENV

    if "://" in output_uri and not os.environ.get(KEY_ENV):
        raise ValueError(f"{KEY_ENV} is not set: on a cluster the pseudonym key comes from the credentials secret "
                         "(docs/pipeline.md, Secrets)")


REFIT = -1
"""The training job that is not a fold: teacher and students on every scan (the model ``register`` ships)."""


def fold_ids(folds_dir: str | Path) -> list[int]:
    """The folds of ``folds.parquet``, ascending."""
    return sorted({int(f) for f in pq.read_table(Path(folds_dir) / "folds.parquet", columns=["fold"])
                   .column("fold").to_pylist()})


def training_jobs(folds_dir: str | Path, register_mode: str) -> list[int]:
    """What the pipeline's ParallelFor iterates: the folds, then :data:`REFIT` when ``register_mode`` is
    ``refit``. Training the refit beside the folds (its own pod and GPU on a cluster; two jobs at a time
    with kfp.local) rather than after evaluation takes it off the critical path."""
    return fold_ids(folds_dir) + ([REFIT] if register_mode == "refit" else [])


def job_arguments(ref: RunRef, job: int, folds_dir: str | Path) -> dict[str, Any]:
    """``distill``'s fold arguments for a training job: a fold under the ``cross-validation`` run, or the
    refit (all scans, no validation fold) under the ``pipeline`` run, as in ``blendsign run``."""
    if job == REFIT:
        return {"fold": None, "folds_dir": None, "parent_run_id": ref.parent_run_id}
    return {"fold": job, "folds_dir": folds_dir, "parent_run_id": ref.cv_run_id}


def gather_fold_models(model_dirs: Iterable[str | Path], dest: str | Path, pattern: str = "fold*") -> Path:
    """Copy each distilled fold's ``distill.json`` and final checkpoint into ``dest/fold<k>/`` (the layout
    ``evaluate`` and ``register --register fold-ensemble`` read); intermediate checkpoints stay behind.
    ``pattern="all"`` gathers the refit instead."""
    from blendsign.distill import final_checkpoint

    dest = Path(dest)
    seen: set[str] = set()
    for folder in model_dirs:
        for fold_dir in sorted(Path(folder).glob(pattern)):
            if fold_dir.name in seen:
                raise ValueError(f"{fold_dir.name} given twice")
            seen.add(fold_dir.name)
            target, final = dest / fold_dir.name, final_checkpoint(fold_dir)
            for src, dst in ((final, target / final.relative_to(fold_dir)),
                             (fold_dir / "distill.json", target / "distill.json")):  # a re-run overwrites
                with atomic_path(dst) as tmp:
                    shutil.copy2(src, tmp)
    if not seen:
        raise FileNotFoundError(f"no distilled {'refit' if pattern == 'all' else 'fold'} among the collected models")
    return dest


def read_metrics(evaluation_dir: str | Path) -> dict[str, Any]:
    """``metrics.json`` of an ``evaluate`` output, undefined values (JSON null) back to NaN."""
    m = json.loads((Path(evaluation_dir) / "metrics.json").read_text())

    def nan(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: nan(x) for k, x in v.items()}
        if isinstance(v, list):
            return [nan(x) for x in v]
        return math.nan if v is None else v

    return {k: nan(v) if k in ("per_fold", "cv", "ci", "scan") else v for k, v in m.items()}


def load_evaluation(evaluation_dir: str | Path) -> Any:
    """The :class:`blendsign.evaluate.EvalResult` of an ``evaluate`` output folder (``metrics.json``)."""
    from blendsign.evaluate import EvalResult

    folder = Path(evaluation_dir)
    m = read_metrics(folder)
    return EvalResult(folder, {int(k): v for k, v in m["per_fold"].items()},
                      {k: tuple(v) for k, v in m["cv"].items()}, {k: tuple(v) for k, v in m["ci"].items()},
                      m["scan"])


def cv_metrics(evaluation_dir: str | Path) -> dict[str, float]:
    """``cv_<metric>_<class>`` means over folds (finite ones), as on the parent MLflow run."""
    cv = read_metrics(evaluation_dir)["cv"]
    return finite({f"cv_{k}": v[0] for k, v in cv.items()})


def finish_pipeline_run(ref: RunRef, *, evaluation_dir: str | Path, registered: Mapping[str, Any]) -> dict[str, Any]:
    """Log the CV metrics on the parent run, end it, and return the run record (``last_run.json``'s keys)."""
    tracker = ref.tracker()
    with tracker.run("pipeline", run_id=ref.parent_run_id) as parent:
        parent.log_metrics(cv_metrics(evaluation_dir))
        parent.set_tags({"status": "registered", "registered_version": registered["model_version"],
                         "registered_alias": registered["alias"]})
    return {"tracking_uri": ref.tracking_uri, "experiment": ref.experiment, "parent_run_id": ref.parent_run_id,
            **registered, "status": "registered"}


def end_skipped_run(ref: RunRef, decision: Any) -> dict[str, Any]:
    """End a run that found no new data (``decision``: a :class:`blendsign.retrain.RetrainDecision`): the
    parent run says why, the unused cross-validation run is deleted; the record names the unchanged champion."""
    tracker = ref.tracker()
    tracker.client.delete_run(ref.cv_run_id)
    with tracker.run("pipeline", run_id=ref.parent_run_id) as parent:
        parent.set_tags({"status": "skipped: no new data", "retrain_decision": decision.reason})
    name = decision.model_name
    return {"tracking_uri": ref.tracking_uri, "experiment": ref.experiment, "parent_run_id": ref.parent_run_id,
            "registered_model": name, "model_version": decision.champion_version, "alias": "champion",
            "promoted": False, "decision": decision.reason, "model_uri": f"models:/{name}@champion",
            "version_uri": f"models:/{name}/{decision.champion_version}", "status": "skipped"}
