"""The pipeline's steps, each a library function that a Kubeflow component and ``blendsign run`` both call.

check_run → snapshot → ingest_step → fuse_step → folds_step → start_run (the parent MLflow run,
``blendsign.run_tree``) → check_new_data → train_job per training job (the folds and the refit; teacher,
then students) → evaluate_step → register_step; no_new_data ends a run early; end_run is the exit handler.
:func:`run_pipeline` chains them in one process; ``blendsign.pipelines`` wires the same functions as pods.

Each step first exports the task's mounted credentials (``blendsign.credentials``; a no-op elsewhere).
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypedDict, TypeVar

from blendsign import credentials, storage
from blendsign.config import Config, RegistryConfig, load_preset, override, override_dotted
from blendsign.errors import ConfigError, InputError
from blendsign.folds import FOLDS_REPORT, FOLDS_REPORT_MD, FoldsResult, fold_ids, make_folds
from blendsign.ingest import REPORT as INGEST_REPORT
from blendsign.ingest import REPORT_MD as INGEST_REPORT_MD
from blendsign.ingest import IngestResult, data_fingerprint, find_clinical, read_report
from blendsign.labels import AGREEMENT, AGREEMENT_MD, FuseResult, read_agreement
from blendsign.run_tree import RunRef, end_skipped_run, end_unfinished_runs, finish_pipeline_run, open_pipeline_run
from blendsign.storage import write_json_atomic, write_text_atomic
from blendsign.tracking import LOCAL_DIR, Tracker, check_server_version, display_uri, finite, git_commit, ui_command

if TYPE_CHECKING:  # torch and scikit-learn: not imported by the light pipeline steps
    from blendsign.distill import DistillResult
    from blendsign.evaluate import EvalResult
    from blendsign.retrain import RetrainDecision

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

REFIT = -1
"""The training job that is not a fold: teacher and students on every scan (the model ``register`` ships)."""
JOBS, MODELS = "jobs", "models"  # a run's work folder: jobs/<fold folder> (checkpoints), models/<fold folder>


RECORD_ENV = "BLENDSIGN_RUN_RECORD"  # set by `pipeline run --local`: where the step ending the run writes its record
MODEL_CARD = "model_card.md"  # the registered version's card, in the register step's output
RUN_RECORD = LOCAL_DIR / "last_run.json"  # the last run's record here (run_tree.RunRecord), for people and tests


def _published(record: dict[str, Any]) -> dict[str, Any]:
    """The run record, also written to ``$BLENDSIGN_RUN_RECORD`` when set (how kfp.local hands it back)."""
    if os.environ.get(RECORD_ENV):
        write_json_atomic(os.environ[RECORD_ENV], record)
    return record


def step(fn: Callable[P, R]) -> Callable[P, R]:
    """A pipeline step: the task's mounted credentials are in the environment before it runs."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        credentials.load()
        return fn(*args, **kwargs)

    return wrapper


def pipeline_config(preset: str, *, k: int | None = None, rounds: int | None = None,
                    device: str | None = None) -> Config:
    """The preset with the pipeline's parameters applied; ``k`` ≤ 0, ``rounds`` < 0 or ``None``: the preset's.
    ``device``: the compiled pipeline's requirement for GPU tasks (``cuda``: no silent CPU fallback)."""
    cfg = load_preset(preset)
    return override(cfg, folds={"k": k} if k is not None and k > 0 else {},
                    distill={"rounds": rounds} if rounds is not None and rounds >= 0 else {},
                    train={"device": device} if device else {})


# --- the run's inputs, checked before any data moves ---------------------------------------------------


def with_registry(cfg: Config, *, mode: str | None = None, name: str | None = None, metric: str | None = None,
                  margin: float | None = None) -> Config:
    """``cfg`` with the registry settings given as arguments (the pipeline's parameters); ``None`` keeps cfg's.
    :class:`RegistryConfig` refuses an unknown register mode or a negative margin."""
    given = {"registry.mode": mode, "registry.model_name": name, "registry.promotion_metric": metric,
             "registry.promotion_margin": margin}
    return override_dotted(cfg, {k: v for k, v in given.items() if v is not None})


def check_settings(registry: RegistryConfig, *, k: int | None = None, rounds: int | None = None) -> None:
    """What a run refuses from its parameters alone (here, before submitting, and in its first step): an unknown
    promotion metric, and impossible fold or round counts, which would fail after training."""
    from blendsign.registry import check_promotion_metric

    check_promotion_metric(registry.promotion_metric)
    if k is not None and k not in (0,) and k < 2:
        raise ConfigError(f"k must be at least 2 folds (0: the preset's), got {k}")
    if rounds is not None and rounds < -1:
        raise ConfigError(f"rounds must be 0 or more (-1: the preset's), got {rounds}")


@dataclass(frozen=True)
class RunInputs:
    """A run's inputs after :func:`check_run`: the clinical list it found, the tracking URI it will use."""

    source: str
    annotations: str
    clinical: str  # "" when there is none (postoperative exclusion then not applied)
    tracking_uri: str
    work_uri: str
    checks: tuple[str, ...] = field(default_factory=tuple)

    def markdown(self) -> str:
        return "\n".join(["# Run inputs: checked", "", *[f"- {c}" for c in self.checks], ""])


def check_tracking_server(uri: str, *, on_cluster: bool, timeout: float = 15.0) -> str:
    """Refuse a tracking URI the other steps could not use: on a cluster, anything but an MLflow server (a SQLite
    file in one pod is seen by no other pod); a server that does not answer an authenticated request (the MLflow
    client's own, so its credentials and TLS settings count) within ``timeout`` seconds, without retries.
    Returns what was checked, for the report."""
    shown = display_uri(uri)
    if not uri.startswith(("http://", "https://", "databricks")):
        if on_cluster:
            raise ConfigError(f"MLflow tracking URI {shown!r} is not a server: each pod would log to its own store. "
                             "Set the tracking_uri parameter or MLFLOW_TRACKING_URI in the credentials secret to "
                             "the MLflow server (docs/pipeline.md, Secrets)")
        return f"MLflow store {shown} (local)"
    from mlflow import MlflowClient

    with credentials.environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout))):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # connection, TLS, HTTP 401/403/5xx: all mean the steps could not log
            message = str(getattr(exc, "message", exc)).replace(uri, shown).splitlines()[0][:300]
            raise ConfigError(f"MLflow server {shown} did not answer from here (reachable? credentials?): "
                             f"{type(exc).__name__}: {message}") from None
    server = check_server_version(uri)
    return f"MLflow server {shown}: reachable, credentials accepted, MLflow {server or 'version unknown'}"


def _check_work(work_uri: str, *, on_cluster: bool) -> str:
    """The work prefix must outlive the pod on a cluster, and be writable."""
    if on_cluster and not storage.is_s3(work_uri):
        raise ConfigError("work_uri must be an s3:// prefix on a cluster: training checkpoints go there each epoch so "
                         f"that a retried or pre-empted pod resumes (got {work_uri!r})")
    if storage.is_s3(work_uri):
        probe = storage.join(work_uri, ".blendsign-write-check")
        bucket, key = storage.split_s3(probe)
        try:
            client = storage.s3_client()
            client.put_object(Bucket=bucket, Key=key, Body=b"ok")
            client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:  # botocore's errors: any of them means no checkpoint could be written
            raise ConfigError(f"cannot write to the work prefix {work_uri}: {type(exc).__name__}: {exc}") from None
        return f"work prefix {work_uri}: writable"
    return f"work folder {work_uri}"


@step
def check_run(*, source: str, annotations: str, clinical: str = "", preset: str | Config, k: int = 0, rounds: int = -1,
              metric: str | None = None, register_mode: str | None = None, margin: float | None = None,
              tracking_uri: str = "", work_uri: str, on_cluster: bool) -> RunInputs:
    """Everything a run can check before data moves (the pipeline's first step; ``blendsign run`` too): the
    parameters, the inputs present, the clinical list (given, or found in or beside the source), the
    pseudonym key on a cluster, the tracking server reachable, the work prefix writable. ``metric``,
    ``register_mode``, ``margin``: ``None`` is the preset's (:func:`with_registry`)."""
    from blendsign.deid import KEY_ENV

    checks: list[str] = []
    if not source or not annotations:
        missing = [n for n, v in (("source_uri", source), ("annotations_uri", annotations)) if not v]
        raise InputError(f"missing input(s): {', '.join(missing)} (the DICOM export and its annotation CSV)")
    cfg = pipeline_config(preset, k=k, rounds=rounds) if isinstance(preset, str) else preset
    reg = with_registry(cfg, mode=register_mode, metric=metric, margin=margin).registry
    check_settings(reg, k=k, rounds=rounds)
    checks.append(f"preset {cfg.preset}: {cfg.folds.k} folds, {cfg.distill.rounds} distillation rounds, "
                  f"promotion on {reg.promotion_metric} (margin {reg.promotion_margin:g}), register {reg.mode}")
    if not storage.exists(source) or storage.is_file(source):
        raise FileNotFoundError(f"the DICOM source {source} is not a folder (or s3:// prefix) holding files")
    if not storage.is_file(annotations):
        raise FileNotFoundError(f"annotation CSV {annotations} not found")
    checks.append(f"inputs present: {source}, {annotations}")
    if clinical:
        if not storage.is_file(clinical):
            raise FileNotFoundError(f"clinical list {clinical} not found")
        checks.append(f"clinical list: {clinical}")
    else:
        clinical = find_clinical(source) or ""
        checks.append(f"clinical list: {clinical} (found beside the source)" if clinical else
                      "no clinical list given or found in or beside the source: postoperative exclusion not applied")
    if on_cluster and not os.environ.get(KEY_ENV):
        raise ConfigError(f"{KEY_ENV} is not set: on a cluster the pseudonym key comes from the credentials secret "
                         "(docs/pipeline.md, Secrets)")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        if on_cluster:
            raise ConfigError("no MLflow tracking URI: set the tracking_uri parameter or MLFLOW_TRACKING_URI in the "
                             "credentials secret (docs/pipeline.md, Secrets)")
        from blendsign.tracking import tracking_uri as default_uri

        uri = default_uri()
    checks.append(check_tracking_server(uri, on_cluster=on_cluster))
    checks.append(_check_work(work_uri, on_cluster=on_cluster))
    for line in checks:
        log.info("%s", line)
    return RunInputs(source, annotations, clinical, uri, work_uri, tuple(checks))


# --- data stages ---------------------------------------------------------------------------------------


def _tags(cfg: Config, manifest: str | Path | None) -> dict[str, str]:
    tags = {"preset": cfg.preset}
    if manifest is not None:
        tags["data_fingerprint"] = data_fingerprint(manifest)
    return tags


@step
def snapshot(source: str, annotations: str, clinical: str) -> str:
    """The digest of what lies under the input URIs: ingestion's cache key (new data, new digest)."""
    from blendsign.retrain import source_digest

    return source_digest(source, annotations, clinical)


@step
def open_tracker(experiment: str, tracking_uri: str = "") -> Tracker:
    """The MLflow experiment a step logs to, opened once the task's credentials are in the environment."""
    return Tracker.open(experiment, uri=tracking_uri or None)


@step
def ingest_step(cfg: Config, source: str | Path, out: str | Path, *, clinical: str | Path | None = None,
                tracker: Tracker | None = None, progress: bool = True) -> IngestResult:
    """DICOM (a folder or an ``s3://`` prefix) → the de-identified slice dataset in ``out``, logged as run
    ``ingest`` (its own run: cached across pipeline runs, linked by the data fingerprint)."""
    from blendsign.remote import ingest_uri

    result = ingest_uri(source, out, cfg.ingest, clinical_csv=clinical or None, progress=progress).result
    if tracker is not None:
        r = result.report
        with tracker.run("ingest", tags={**_tags(cfg, result.out), "stage": "ingest"}) as run:
            run.log_params({f"ingest.{k}": v for k, v in r["config"].items()})
            run.log_metrics({"studies_found": r["studies_found"], "scans_written": r["scans_written"],
                             "slices_written": r["slices_written"], "quarantined": len(r["quarantined"]),
                             "duplicates": len(r["duplicates"]),
                             **{f"excluded_{k}": v for k, v in r["excluded"].items()}})
            for name in (INGEST_REPORT, INGEST_REPORT_MD):
                run.log_artifact(result.out / name, "ingest")
    return result


@step
def fuse_step(cfg: Config, annotations: str | Path, ingest_dir: str | Path, out: str | Path, *,
              tracker: Tracker | None = None) -> FuseResult:
    """The readers' annotations (a file or ``s3://`` object) → gold labels, fused boxes, Fleiss' κ; run ``fuse``."""
    from blendsign.remote import fuse_uri

    result = fuse_uri(annotations, ingest_dir, out, cfg.labels).result
    if tracker is not None:
        with tracker.run("fuse", tags={**_tags(cfg, ingest_dir), "stage": "fuse"}) as run:
            run.log_params({f"labels.{k}": v for k, v in cfg.to_dict()["labels"].items()})
            run.log_metrics(finite({**{f"kappa_{k}": v for k, v in result.kappa.items() if v is not None},
                                    **{f"slices_{k}": v for k, v in result.gold_counts.items()},
                                    "contested": result.contested, "unmatched_annotation_rows": result.unmatched_rows}))
            for name in (AGREEMENT, AGREEMENT_MD):
                run.log_artifact(Path(out) / name, "fuse")
    return result


@step
def folds_step(cfg: Config, labels_dir: str | Path, out: str | Path, *, manifest: str | Path | None = None,
               tracker: Tracker | None = None) -> FoldsResult:
    """Patient-level stratified folds; run ``folds``."""
    result = make_folds(labels_dir, out, cfg.folds)
    if tracker is not None:
        with tracker.run("folds", tags={**_tags(cfg, manifest), "stage": "folds"}) as run:
            run.log_params({f"folds.{k}": v for k, v in cfg.to_dict()["folds"].items()})
            run.log_metrics({"patients": result.patients, "scans": result.scans})
            for name in (FOLDS_REPORT_MD, FOLDS_REPORT):
                run.log_artifact(Path(out) / name, "folds")
    return result


def training_jobs(folds_dir: str | Path, register_mode: str) -> list[int]:
    """What the training loop runs: the folds, then :data:`REFIT` when ``register_mode`` is ``refit`` (trained
    beside the folds rather than after the evaluation: off the critical path)."""
    return fold_ids(folds_dir) + ([REFIT] if register_mode == "refit" else [])


def job_label(job: int) -> str:
    """``fold 2`` or ``refit``: how logs, reports and the Kubeflow UI name a training job."""
    return "refit" if job == REFIT else f"fold {job}"


def job_metadata(job: int, result: DistillResult) -> dict[str, Any]:
    """What a training job's model artifact says in the Kubeflow UI (the UI numbers loop iterations only)."""
    auc = result.final.held_out()
    return {"job": job_label(job), "held_out_fold": "none (all scans)" if job == REFIT else job,
            "rounds": len(result.rounds) - 1, "epochs": result.final.epochs,
            **({"held_out_auc_blend_sign": round(auc, 4)} if auc is not None else {})}


def job_markdown(job: int, result: DistillResult) -> str:
    """A training job's summary for the Kubeflow UI: which job this loop iteration was, and how it went."""
    m = job_metadata(job, result)
    what = "teacher" if m["rounds"] == 0 else f"teacher and {m['rounds']} student round(s)"
    auc = f"; held-out AUC blend sign {m['held_out_auc_blend_sign']}" if "held_out_auc_blend_sign" in m else ""
    return f"# {m['job']}\n\n{what}, {m['epochs']} epochs each; held-out fold: {m['held_out_fold']}{auc}\n"


# --- the parent run ------------------------------------------------------------------------------------


@step
def start_run(cfg: Config, *, manifest: str | Path, tracking_uri: str, experiment: str, run_id: str | None,
              work_uri: str, tags: Mapping[str, str] | None = None) -> RunRef:
    """Open the parent MLflow run of pipeline run ``run_id``; its training jobs work under ``work_uri/<run id>``.

    ``run_id`` None (``blendsign run``): a fresh id, and the jobs work in ``work_uri`` itself, so that running
    again into the same folder continues where the last run stopped.
    """
    work = storage.join(work_uri, run_id) if run_id else work_uri
    return open_pipeline_run(cfg, fingerprint=data_fingerprint(manifest), tracking_uri=tracking_uri,
                             experiment=experiment, run_id=run_id or uuid.uuid4().hex, work=work, tags=tags)


@step
def check_new_data(ref: RunRef, *, manifest: str | Path, model_name: str, only_if_new_data: bool) \
        -> RetrainDecision:
    """``retrain`` or ``skip``: is this dataset's fingerprint new to the registered model? (``retrain.decide``)"""
    from blendsign.head_to_head import CHAMPION_TAG, MODEL_TAG
    from blendsign.retrain import decide

    client = ref.tracker().client
    decision = decide(manifest, client=client, model_name=model_name, only_if_new_data=only_if_new_data)
    client.set_tag(ref.parent_run_id, "retrain_decision", decision.reason)
    client.set_tag(ref.parent_run_id, MODEL_TAG, model_name)  # evaluate compares with this champion
    if decision.champion_version:
        client.set_tag(ref.parent_run_id, CHAMPION_TAG, decision.champion_version)
    return decision


@step
def no_new_data(ref: RunRef, decision: RetrainDecision) -> dict[str, Any]:
    """The early end of a run without new data: the parent MLflow run says why; the champion stays."""
    return _published(end_skipped_run(ref, decision))


@step
def end_run(*, tracking_uri: str, experiment: str, run_id: str, state: str | None = None) -> list[str]:
    """The exit handler: end what the pipeline run left RUNNING (:func:`run_tree.end_unfinished_runs`). Never
    raises: a tracking server that cannot be reached is logged, the Kubeflow run's own state stands."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    try:
        return end_unfinished_runs(uri, experiment, run_id, state)
    except Exception as exc:  # the exit handler reports; it must not turn a finished run into a failed one
        log.error("could not end the MLflow runs of pipeline run %s in %s: %s: %s", run_id, uri,
                  type(exc).__name__, exc)
        return []


# --- training jobs -------------------------------------------------------------------------------------


@step
def train_job(cfg: Config, ref: RunRef, job: int, *, ingest_dir: str | Path, labels_dir: str | Path,
              folds_dir: str | Path, rounds: int | None = None, export: str | Path | None = None,
              progress: bool = True) -> DistillResult:
    """One training job (a fold, under ``cross-validation``, or the refit, under ``pipeline``): the teacher
    (``rounds=0``) or teacher + students, as ``blendsign distill``.

    Its checkpoints live in ``ref.work/jobs/<fold folder>``: on S3 a copy is pushed after every epoch, so a
    retried or pre-empted pod finds them and resumes (bit-exactly, ``train``'s resume). Its final model (model
    and ``distill.json``, nothing else) is exported to ``ref.work/models/<fold folder>`` and to ``export``.
    """
    from blendsign.checkpoint import LAST
    from blendsign.distill import STATE_FILE, distill, export_final, job_dir_name

    fold = None if job == REFIT else job
    name = job_dir_name(fold)
    parent = ref.parent_run_id if fold is None else ref.cv_run_id
    log.info("%s: %s", job_label(job), "teacher" if rounds == 0 else "teacher and students")
    # a killed upload must not leave a "finished" checkpoint or distillation without what it finished
    with storage.mirrored(storage.join(ref.work, JOBS, name), last=(LAST, STATE_FILE)) as mirror, \
            ref.step(job_label(job)) as tracker:
        result = distill(cfg, ingest_dir=ingest_dir, labels_dir=labels_dir,
                         folds_dir=None if fold is None else folds_dir, fold=fold, out_dir=mirror.local.parent,
                         rounds=rounds, tracker=tracker, parent_run_id=parent, progress=progress,
                         on_checkpoint=mirror.push)
        if rounds is None or rounds == cfg.distill.rounds:  # the job's final model (not a teacher on its way)
            with storage.local_output(storage.join(ref.work, MODELS, name)) as published:
                export_final(mirror.local, Path(published).parent)
        if export is not None:
            export_final(mirror.local, export)
    return result


# --- evaluation and registry ---------------------------------------------------------------------------


@contextmanager
def job_models(ref: RunRef, jobs: Sequence[int], sources: Sequence[str | Path] | None = None) -> Iterator[Path]:
    """A local folder holding the exported final models of ``jobs`` (``fold<k>/``, ``all/``): gathered from
    ``sources`` (folders holding them: the Kubeflow artifacts), or, when None, from the run's work folder
    (``ref.work/models``; on S3 only those jobs' complete exports are downloaded)."""
    from blendsign.distill import gather, job_dir_name

    names = [job_dir_name(None if j == REFIT else j) for j in jobs]
    with storage.scratch_dir(None) as tmp:
        if sources is None:
            models = storage.join(ref.work, MODELS)
            if not storage.is_s3(models):
                sources = [models]
            else:
                for name in names:  # each a complete export (its _SUCCESS marker), mirrored into tmp/s3 and kept
                    try:
                        with storage.local_input(storage.join(models, name), cache=tmp / "s3", require_marker=True):
                            pass
                    except FileNotFoundError as exc:
                        raise FileNotFoundError(f"{name}: no finished model in the run's work prefix (did its "
                                                f"training step fail?): {exc}") from None
                sources = [storage.mirror_path(tmp / "s3", models)]
        found = gather(sources, tmp / "gathered", names=names)
        yield found


@step
def evaluate_step(cfg: Config, ref: RunRef, *, ingest_dir: str | Path, labels_dir: str | Path, folds_dir: str | Path,
                  out: str | Path, model_sources: Sequence[str | Path] | None = None, progress: bool = True) \
        -> EvalResult:
    """Every fold's final model on its held-out fold (``blendsign evaluate``), logged on ``cross-validation``;
    the evaluation goes to ``out/evaluation``. The fold models come from ``model_sources`` or the run's work
    folder (:func:`job_models`); ``register`` reads them from there too, so ``out`` does not carry them."""
    from blendsign.evaluate import PREDICTIONS_FILE, evaluate
    from blendsign.head_to_head import CHAMPION_TAG, FILE, MODEL_TAG, compare

    out_dir = Path(out) / "evaluation"
    with job_models(ref, fold_ids(folds_dir), model_sources) as found, ref.step("evaluate") as tracker:
        result = evaluate(cfg, ingest_dir=ingest_dir, labels_dir=labels_dir, folds_dir=folds_dir, models_dir=found,
                          out_dir=out_dir, tracker=tracker, run_id=ref.cv_run_id, progress=progress)
        tags = tracker.client.get_run(ref.parent_run_id).data.tags
        if MODEL_TAG in tags:  # check_new_data ran: compare with the champion it saw
            compare(client=tracker.client, tracking_uri=tracker.uri, name=tags[MODEL_TAG],
                    champion_version=tags.get(CHAMPION_TAG), ingest_dir=ingest_dir, labels_dir=labels_dir,
                    folds_dir=folds_dir, predictions=out_dir / PREDICTIONS_FILE, device=cfg.train.device,
                    batch_size=cfg.train.batch_size).write(out_dir)
            tracker.client.log_artifact(ref.cv_run_id, str(out_dir / FILE), "evaluation")
        return result


@step
def register_step(cfg: Config, ref: RunRef, *, cv_dir: str | Path, ingest_dir: str | Path, labels_dir: str | Path,
                  out_dir: str | Path | None = None, card_path: str | Path | None = None, mode: str | None = None,
                  name: str | None = None, metric: str | None = None, margin: float | None = None) -> dict[str, Any]:
    """Register the refit or the fold ensemble (the models the run's training jobs exported, :func:`job_models`:
    only those it ships are read) behind the champion gate (``registry.py``), end the parent run, and return the
    run record. ``mode``, ``name``, ``metric``, ``margin``: ``None`` is ``cfg.registry``'s. ``cv_dir/evaluation``
    holds the CV metrics; ``out_dir`` (default: a temporary folder) keeps the registered checkpoints and the model
    card; ``card_path``: the card is written there too. ``ingest_dir``: the ingest output or its summary
    (``ingest.export_summary``)."""
    import shutil
    import tempfile

    from blendsign.distill import final_checkpoint
    from blendsign.evaluate import EvalResult, read_metrics
    from blendsign.head_to_head import SCANS_ARTIFACT, HeadToHead, write_training_scans
    from blendsign.ingest import read_manifest
    from blendsign.model_package import log_model
    from blendsign.registry import Promotion, baseline_verdict, check_promotion_metric, model_card, register_version

    cfg = with_registry(cfg, mode=mode, name=name, metric=metric, margin=margin)
    check_settings(cfg.registry)
    mode, name, metric, margin = (cfg.registry.mode, cfg.registry.model_name, cfg.registry.promotion_metric,
                                  cfg.registry.promotion_margin)
    cv_dir = Path(cv_dir)
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="blendsign-register-") as tmp:
            return register_step(cfg, ref, cv_dir=cv_dir, ingest_dir=ingest_dir, labels_dir=labels_dir, out_dir=tmp,
                                 card_path=card_path)
    out_dir = Path(out_dir)
    evaluation = EvalResult.load(cv_dir / "evaluation")
    metrics = read_metrics(cv_dir / "evaluation")
    value = metrics["cv"][check_promotion_metric(metric).removeprefix("cv_")][0]
    with ref.step("register") as tracker:
        jobs = [REFIT] if mode == "refit" else sorted(evaluation.per_fold)  # the folds that were evaluated
        with job_models(ref, jobs) as found:
            shutil.rmtree(out_dir / "models", ignore_errors=True)
            shutil.copytree(found, out_dir / "models")
        checkpoints = [final_checkpoint(p) for p in sorted((out_dir / "models").iterdir())]
        fingerprint, commit = data_fingerprint(ingest_dir), git_commit()
        tags = {"data_fingerprint": fingerprint, "git_commit": commit, "preset": cfg.preset, "register_mode": mode,
                **{f"cv_{k}": f"{v[0]:.6f}" for k, v in metrics["cv"].items() if v[0] == v[0]},
                **({"image": os.environ["BLENDSIGN_IMAGE_REF"]} if os.environ.get("BLENDSIGN_IMAGE_REF") else {})}
        with tracker.run("register", parent_run_id=ref.parent_run_id,
                         tags={**_tags(cfg, ingest_dir), "stage": "register"}) as run:
            run.log_params({"register.mode": mode, "register.metric": metric, "register.margin": margin,
                            "register.name": name, "register.checkpoints": len(checkpoints)})
            model_uri = log_model(run_id=run.run_id, tracking_uri=tracker.uri, checkpoints=checkpoints,
                                  registered_model_name=name)
            ingest_report, agreement = read_report(ingest_dir), read_agreement(labels_dir)
            reproduce = (f"blendsign run --source DICOM --annotations CSV --config {cfg.preset} --register {mode} "
                         f"--metric {metric} --margin {margin:g}")  # no paths: folder names may identify patients

            def card_of(version: str, promotion: Promotion) -> str:
                return model_card(name=name, version=version, mode=mode, preset=cfg.preset, metrics=metrics,
                                  agreement=agreement, ingest=ingest_report, fingerprint=fingerprint, commit=commit,
                                  image=tags.get("image"), promotion=promotion, command=reproduce)

            write_training_scans(read_manifest(ingest_dir), out_dir / Path(SCANS_ARTIFACT).name)
            run.log_artifact(out_dir / Path(SCANS_ARTIFACT).name, str(Path(SCANS_ARTIFACT).parent))
            shortfalls = baseline_verdict(metrics, cfg.eval.baseline_margin)
            if shortfalls and not cfg.eval.refuse_below_baselines:
                log.warning("not refused (preset %s: eval.refuse_below_baselines = false), although %s", cfg.preset,
                            "; ".join(shortfalls))
                tags["baseline_shortfalls"] = "; ".join(shortfalls)
            version, promotion = register_version(tracker.client, name=name, run_id=run.run_id, metric=metric,
                                                  value=value, margin=margin, tags=tags, card=card_of,
                                                  head_to_head=HeadToHead.read(cv_dir / "evaluation"),
                                                  refusals=shortfalls if cfg.eval.refuse_below_baselines else ())
            card = card_of(version, promotion)
            write_text_atomic(out_dir / MODEL_CARD, card)
            if card_path is not None:
                write_text_atomic(card_path, card)
            run.log_artifact(out_dir / MODEL_CARD, "registry")
            run.log_metrics({metric: value, "promoted": float(promotion.promoted),
                             "rejected": float(promotion.rejected)})
        registered = {"registered_model": name, "model_version": version, "alias": promotion.alias or "rejected",
                      "promoted": promotion.promoted, "rejected": promotion.rejected, "decision": promotion.text,
                      "model_uri": f"models:/{name}@champion", "version_uri": model_uri}
        record = finish_pipeline_run(ref, cv_metrics=evaluation.cv_means(), registered=registered)
        return _published({**record, "cv_uri": str(cv_dir)})


# --- the whole job in one process ----------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineResult:
    work_dir: Path
    evaluation: EvalResult | None  # None: the run ended early (no new data)
    record: dict[str, Any]

    def summary(self) -> str:
        r = self.record
        lines = [f"pipeline {r['status']}: work folder {self.work_dir}"]
        if r["status"] == "registered":
            lines.append(f"registered {r['registered_model']} v{r['model_version']} as {r['alias']}: {r['decision']}")
        else:
            lines.append(r["decision"])
        lines.append(f"champion: {r['model_uri']}")
        if self.evaluation is not None:
            lines += ["", self.evaluation.summary()]
        lines += ["", f"MLflow: {display_uri(r['tracking_uri'])} (experiment {r['experiment']}, parent run "
                  f"{r['parent_run_id']}); UI: {ui_command(r['tracking_uri'])}",
                  f"run record: {RUN_RECORD}"]
        return "\n".join(lines)


class _DataDirs(TypedDict):
    """The ingest and fuse outputs that the training, evaluation and register steps take, as keywords."""

    ingest_dir: Path
    labels_dir: Path


def run_pipeline(
    cfg: Config,
    *,
    work_dir: str | Path,
    source: str | Path | None = None,
    annotations: str | Path | None = None,
    clinical: str | Path | None = None,
    tracker: Tracker,
    register_mode: str | None = None,
    model_name: str | None = None,
    metric: str | None = None,
    margin: float | None = None,
    only_if_new_data: bool = False,
    progress: bool = True,
) -> PipelineResult:
    """The main job in one process, step by step as the Kubeflow pipeline runs it (the same functions, the same
    MLflow run tree); the embedded synthetic cohort when no source is given. ``register_mode``, ``model_name``,
    ``metric``, ``margin``: ``None`` is ``cfg.registry``'s."""
    if (annotations is None) != (source is None):
        raise InputError("give a DICOM source and its annotations together, or neither (the synthetic cohort)")
    cfg = with_registry(cfg, mode=register_mode, name=model_name, metric=metric, margin=margin)
    check_settings(cfg.registry)
    work = Path(work_dir)
    if source is None:
        from blendsign.synth import synthesize

        log.info("%s", synthesize(work / "source", cfg.synth, progress=progress).summary())
        source, annotations = work / "source" / "dicom", work / "source" / "annotations.csv"
    inputs = check_run(source=str(source), annotations=str(annotations), clinical=str(clinical or ""),
                       preset=cfg, tracking_uri=tracker.uri, work_uri=str(work), on_cluster=False)
    ing = ingest_step(cfg, inputs.source, work / "ingest", clinical=inputs.clinical, tracker=tracker,
                      progress=progress)
    log.info("%s", ing.summary())
    log.info("%s", fuse_step(cfg, inputs.annotations, work / "ingest", work / "labels", tracker=tracker).summary())
    log.info("%s", folds_step(cfg, work / "labels", work / "folds", manifest=work / "ingest", tracker=tracker)
             .summary())
    ref = start_run(cfg, manifest=work / "ingest", tracking_uri=tracker.uri, experiment=tracker.experiment_name,
                    run_id=None, work_uri=str(work), tags={"orchestrator": "blendsign run"})
    dirs: _DataDirs = {"ingest_dir": work / "ingest", "labels_dir": work / "labels"}
    try:
        decision = check_new_data(ref, manifest=work / "ingest", model_name=cfg.registry.model_name,
                                  only_if_new_data=only_if_new_data)
        if not decision.retrain:
            record = no_new_data(ref, decision)
            evaluation = None
        else:
            for job in training_jobs(work / "folds", cfg.registry.mode):
                log.info("%s", train_job(cfg, ref, job, **dirs, folds_dir=work / "folds", progress=progress)
                         .summary())
            evaluation = evaluate_step(cfg, ref, **dirs, folds_dir=work / "folds", out=work / "cv",
                                       progress=progress)
            record = register_step(cfg, ref, cv_dir=work / "cv", **dirs, out_dir=work / "register")
    finally:
        end_run(tracking_uri=ref.tracking_uri, experiment=ref.experiment, run_id=ref.run_id)
    write_json_atomic(RUN_RECORD, record)
    return PipelineResult(work, evaluation, record)


