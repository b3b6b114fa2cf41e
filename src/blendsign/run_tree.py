"""The MLflow run tree of one pipeline run: the same for ``blendsign run`` (one process) and Kubeflow (a pod
per step), built here and nowhere else.

::

    ingest, fuse, folds          runs of their own (cached across Kubeflow runs), linked by ``data_fingerprint``
    pipeline                     opened by open_pipeline_run; ended by finish_pipeline_run, end_skipped_run or,
    ├── cross-validation             for a run that stopped, end_unfinished_runs (the exit handler)
    │   └── fold<k> → fold<k>-round<r>
    ├── refit → refit-round<r>
    └── register

Every run opened through a :class:`RunRef` carries the tag ``pipeline_run_id`` (on Kubeflow the KFP run id,
else a fresh id), so the exit handler of a killed or failed run finds what it left RUNNING.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blendsign.config import Config
from blendsign.storage import write_json_atomic
from blendsign.tracking import Run, Tracker, display_uri, provenance

log = logging.getLogger(__name__)

RUN_TAG = "pipeline_run_id"
# A run still RUNNING when the pipeline run ends belongs to a step that did not finish it: KILLED when the run
# was cancelled (PipelineTaskFinalStatus.state; the SDK documents CANCELLED, the backend sends CANCELED), else
# FAILED — also after a run that COMPLETED: a leftover is then an attempt that died before a retry succeeded.
KILLED_STATES = {"CANCELED", "CANCELLED"}


@dataclass(frozen=True)
class RunRef:
    """Where a pipeline run logs (store, experiment, parent and cross-validation runs) and works (``work``: the
    folder or ``s3://`` prefix of its training jobs' checkpoints and exported models)."""

    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    cv_run_id: str
    run_id: str  # the pipeline run: KFP run id, or a fresh id for `blendsign run`
    work: str

    def tracker(self) -> Tracker:
        return Tracker.open(self.experiment, uri=self.tracking_uri, tags={RUN_TAG: self.run_id})

    @contextmanager
    def step(self, name: str) -> Iterator[Tracker]:
        """A step logging under this run: if it raises, the parent run is marked FAILED with a ``failed_step``
        tag before the error propagates (a retried step that then succeeds is overruled by
        :func:`finish_pipeline_run`, which ends the parent FINISHED)."""
        tracker = self.tracker()
        try:
            yield tracker
        except BaseException as exc:
            tracker.client.set_tag(self.parent_run_id, "failed_step", f"{name}: {type(exc).__name__}")
            tracker.client.update_run(self.parent_run_id, status="FAILED")
            raise

    def markdown(self) -> str:
        """Where this run logs, for a person (the Kubeflow UI shows it as the ``start_run`` step's output)."""
        shown = display_uri(self.tracking_uri)
        link = (f"{shown.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"
                if shown.startswith(("http://", "https://")) else None)
        return "\n".join(["# MLflow", "", f"- tracking: `{shown}`, experiment `{self.experiment}`",
                          f"- parent run: `{self.parent_run_id}`" + (f" ([open in MLflow]({link}))" if link else ""),
                          f"- cross-validation run: `{self.cv_run_id}`",
                          f"- every run of this pipeline run is tagged `{RUN_TAG} = {self.run_id}`", ""])

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> RunRef:
        return cls(**json.loads(Path(path).read_text()))


def open_pipeline_run(cfg: Config, *, fingerprint: str, tracking_uri: str | None, experiment: str, run_id: str,
                      work: str, tags: Mapping[str, str] | None = None) -> RunRef:
    """Open the parent run ``pipeline`` and its child ``cross-validation`` (both left RUNNING)."""
    tracker = Tracker.open(experiment, uri=tracking_uri or None, tags={RUN_TAG: run_id})
    common = {**provenance(), **tracker.tags, "preset": cfg.preset, "data_fingerprint": fingerprint}
    parent = tracker.client.create_run(tracker.experiment_id, run_name="pipeline",
                                       tags={**common, "stage": "pipeline", **(tags or {})})
    Run(tracker.client, parent.info.run_id).log_params(cfg.flat())
    cv = tracker.client.create_run(tracker.experiment_id, run_name="cross-validation",
                                   tags={**common, "stage": "cross-validation",
                                         "mlflow.parentRunId": parent.info.run_id})
    Run(tracker.client, cv.info.run_id).log_params(cfg.flat())
    ref = RunRef(tracker.uri, experiment, tracker.experiment_id, parent.info.run_id, cv.info.run_id, run_id, work)
    log.info("MLflow parent run %s (cross-validation %s) in %s", ref.parent_run_id, ref.cv_run_id, tracker.uri)
    return ref


def run_record(ref: RunRef, **fields: Any) -> dict[str, Any]:
    """What a finished pipeline run reports (``.blendsign/last_run.json``, the Kubeflow run's output)."""
    return {"tracking_uri": ref.tracking_uri, "experiment": ref.experiment, "parent_run_id": ref.parent_run_id,
            RUN_TAG: ref.run_id, **fields}


def finish_pipeline_run(ref: RunRef, *, cv_metrics: Mapping[str, float], registered: Mapping[str, Any]) \
        -> dict[str, Any]:
    """Log the CV metrics on the parent run, end it FINISHED, and return the run record."""
    with ref.tracker().run("pipeline", run_id=ref.parent_run_id) as parent:
        parent.log_metrics(cv_metrics)
        parent.set_tags({"status": "registered", "registered_version": registered["model_version"],
                         "registered_alias": registered["alias"]})
    return run_record(ref, **registered, status="registered")


def end_skipped_run(ref: RunRef, decision: Any) -> dict[str, Any]:
    """End a run that found no new data (``decision``: a :class:`blendsign.retrain.RetrainDecision`): the
    parent run says why, the unused cross-validation run is deleted; the record names the unchanged champion."""
    tracker = ref.tracker()
    tracker.client.delete_run(ref.cv_run_id)
    with tracker.run("pipeline", run_id=ref.parent_run_id) as parent:
        parent.set_tags({"status": "skipped: no new data", "retrain_decision": decision.reason})
    name = decision.model_name
    return run_record(ref, registered_model=name, model_version=decision.champion_version, alias="champion",
                      promoted=False, decision=decision.reason, model_uri=f"models:/{name}@champion",
                      version_uri=f"models:/{name}/{decision.champion_version}", status="skipped")


def end_unfinished_runs(tracking_uri: str | None, experiment: str, run_id: str, state: str | None = None) \
        -> list[str]:
    """End every run of pipeline run ``run_id`` still RUNNING: the exit handler's work, so that an OOM kill, an
    eviction, a failed step or a run terminated in the Kubeflow UI leaves no MLflow run RUNNING for ever.

    ``state`` is Kubeflow's final state when the backend reports it (``FAILED``, ``CANCELED``, ``COMPLETE``):
    leftovers end KILLED after a cancelled run, else FAILED (a leftover of a completed run is an attempt that died
    before its retry succeeded); the state is recorded in the ``ended_by`` tag. Returns the run ids it ended.
    Nothing is created: an experiment that does not exist has nothing to end.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or None)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    status = "KILLED" if (state or "").upper() in KILLED_STATES else "FAILED"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.{RUN_TAG} = '{run_id}' and "
                              "attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        client.set_tag(run.info.run_id, "ended_by", f"exit handler: pipeline run ended {state or 'unfinished'}")
        client.set_terminated(run.info.run_id, status)
    if runs:
        log.warning("pipeline run %s ended %s: %d MLflow runs left RUNNING are now %s", run_id,
                    state or "without a final state", len(runs), status)
    return [r.info.run_id for r in runs]
