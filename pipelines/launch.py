"""Run the pipeline on this machine (kfp.local), submit it to a Kubeflow Pipelines endpoint, or schedule it.

``blendsign pipeline run --local | submit | schedule`` call these functions. ``submit`` and ``schedule`` ask the
server for its version first and send the variant it runs (``backends.py``), or refuse before uploading.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blendsign.credentials import environment
from blendsign.errors import ConfigError, InputError
from blendsign.pipelines.backends import VARIANTS, Variant, check_variant, server_version, text, variant_for
from blendsign.pipelines.blendsign_pipeline import build_pipeline, compile_pipeline, run_settings
from blendsign.pipelines.profile import ClusterProfile

log = logging.getLogger(__name__)

PARAMETERS = ("source_uri", "annotations_uri", "work_uri", "clinical_uri", "preset", "k", "rounds", "tracking_uri",
              "experiment", "model_name", "promotion_metric", "promotion_margin", "register_mode",
              "only_if_new_data", "credentials_secret")
"""The pipeline's parameters (see ``blendsign_pipeline.build_pipeline``)."""


@dataclass(frozen=True)
class LocalRun:
    record: dict[str, Any]  # the run record, as written to .blendsign/last_run.json
    work_dir: Path
    seconds: float
    summary: str = field(default="")


def _pseudonym_key(work: Path) -> str:
    """This work folder's pseudonym key (``BLENDSIGN_PSEUDONYM_KEY`` if set): the same for every local run,
    so repeated runs give the same pseudonyms, hence the same dataset fingerprint."""
    from blendsign.deid import KEY_ENV, key_path_for, load_or_create_key

    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    load_or_create_key(work / "pipeline", create=True)
    return key_path_for(work / "pipeline").read_text().strip()


def run_local(
    *,
    preset: str,
    work_dir: str | Path,
    source: str | None = None,
    annotations: str | None = None,
    clinical: str | None = None,
    k: int | None = None,
    rounds: int | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    model_name: str | None = None,
    metric: str | None = None,
    margin: float | None = None,
    register_mode: str | None = None,
    only_if_new_data: bool = False,
    progress: bool = True,
) -> LocalRun:
    """The whole pipeline on this machine with kfp.local (SubprocessRunner in this environment).

    ``experiment``, ``model_name``, ``metric``, ``margin``, ``register_mode``: ``None`` is the preset's
    (``tracking``, ``registry``). Without ``source`` the embedded synthetic cohort of ``preset`` is written first
    (``work/source``).
    Task outputs go to ``work/kfp`` (ingest, fuse and folds are cached there on their inputs), the training
    jobs' checkpoints and models to ``work/runs/<run id>``.
    """
    from kfp import local

    from blendsign.config import load_preset
    from blendsign.deid import KEY_ENV
    from blendsign.pipeline import RECORD_ENV, RUN_RECORD, check_settings, with_registry
    from blendsign.storage import write_json_atomic
    from blendsign.tracking import tracking_uri as default_tracking_uri

    start = time.perf_counter()
    work = Path(work_dir).resolve()
    cfg = with_registry(load_preset(preset), mode=register_mode, name=model_name, metric=metric, margin=margin)
    if (annotations is None) != (source is None):
        raise InputError("give a DICOM source and its annotations together, or neither (the synthetic cohort)")
    check_settings(cfg.registry, k=k, rounds=rounds)
    if source is None:
        from blendsign.synth import synthesize

        log.info("%s", synthesize(work / "source", cfg.synth, progress=progress).summary())
        source, annotations = str(work / "source" / "dicom"), str(work / "source" / "annotations.csv")
        clinical = str(work / "source" / "clinical.csv")
    arguments = {
        "source_uri": str(source), "annotations_uri": str(annotations), "work_uri": str(work / "runs"),
        "clinical_uri": str(clinical or ""), "preset": preset, "k": 0 if k is None else k,
        "rounds": -1 if rounds is None else rounds, "tracking_uri": tracking_uri or default_tracking_uri(),
        **run_settings(cfg), "experiment": experiment or cfg.tracking.experiment, "only_if_new_data": only_if_new_data,
    }
    _check_names(arguments)
    root = work / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=True,
               cache_root=str(root / ".cache"))
    # Threads per task for this machine: every task gets all the cores (OMP_NUM_THREADS, if set, wins), and
    # OpenMP threads sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE): two training jobs
    # side by side (kfp.local runs two loop iterations at once) then share the cores about as well as with
    # one thread each, and a job left alone uses them all, where spinning threads would slow both several-fold.
    cores = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 2)
    profile = ClusterProfile()
    profile = replace(profile, **{c: replace(profile.task(c), threads=cores, gpus=0)
                                  for c in ("light", "data", "train", "evaluate", "register")})
    pipeline = build_pipeline(profile, "current", preset, local=True)
    record_file = work / "kfp" / f".run-record-{os.getpid()}.json"
    record_file.unlink(missing_ok=True)
    with warnings.catch_warnings(), environment(**{KEY_ENV: _pseudonym_key(work), RECORD_ENV: str(record_file),
                                            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                                            "BLENDSIGN_PROGRESS_SECONDS": os.environ.get(
                                                "BLENDSIGN_PROGRESS_SECONDS", "30" if progress else "3600")}):
        # kfp.local: resources, accelerators, volumes and secrets are cluster settings (warned about per task);
        # the image name is not run here (the current environment is).
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        pipeline(**arguments)
    if not record_file.is_file():
        raise RuntimeError(f"the local pipeline run ended without a run record ({record_file}); see its log above")
    record = json.loads(record_file.read_text())
    record_file.unlink()
    write_json_atomic(RUN_RECORD, record)
    seconds = time.perf_counter() - start
    return LocalRun(record, work, seconds, summary(record, seconds=seconds))


def summary(record: dict[str, Any], *, seconds: float | None = None) -> str:
    """What a person wants at the end of a run: the champion, the CV metrics, where MLflow is."""
    from mlflow import MlflowClient

    from blendsign.evaluate import METRICS_FILE, EvalResult
    from blendsign.html_report import HTML_REPORT_FILE
    from blendsign.pipeline import RUN_RECORD
    from blendsign.tracking import display_uri, ui_command

    name, uri = record["registered_model"], record["tracking_uri"]
    lines = [f"pipeline {record['status']}" + (f" in {seconds:.0f} s" if seconds is not None else "") + ": "
             + record["decision"]]
    try:
        champion = MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, "champion")
        value = champion.tags.get("promotion", "")
        lines.append(f"champion: {name} v{champion.version} ({record['model_uri']}); {value}")
    except Exception as exc:  # a summary line, not a failure
        lines.append(f"champion: none ({exc.__class__.__name__})")
    if record.get("status") == "registered":
        lines.append(f"this run: {name} v{record['model_version']} as {record['alias']}")
    if record.get("cv_uri") and Path(record["cv_uri"], "evaluation", METRICS_FILE).exists():
        evaluation = Path(record["cv_uri"]) / "evaluation"
        lines += ["", EvalResult.load(evaluation).summary(), f"HTML report: {evaluation / HTML_REPORT_FILE}"]
    lines += ["", f"MLflow: {display_uri(uri)} (experiment {record['experiment']}, parent run "
              f"{record['parent_run_id']}); UI: {ui_command(uri)}", f"run record: {RUN_RECORD}"]
    return "\n".join(lines)


def kfp_cron(expr: str) -> str:
    """A cron expression as Kubeflow Pipelines wants it: six fields, seconds first (``0 0 3 * * *``).

    Five-field (standard) expressions get ``0`` seconds prepended.
    """
    fields = expr.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError(f"cron expression {expr!r} must have 5 fields (standard) or 6 (seconds first)")


def _client(host: str, namespace: str | None) -> Any:
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow")


def _check_names(arguments: dict[str, Any]) -> None:
    unknown = set(arguments) - set(PARAMETERS)
    if unknown:
        raise ConfigError(f"unknown pipeline parameter(s): {sorted(unknown)}")


def _check(arguments: dict[str, Any]) -> None:
    """What can be refused before anything is sent: parameter names and the parameters' own values (the run's
    first step checks the rest: inputs, tracking server, work prefix)."""
    from blendsign.config import Config
    from blendsign.pipeline import check_settings, with_registry

    _check_names(arguments)
    cfg = with_registry(Config(), mode=arguments.get("register_mode"), name=arguments.get("model_name"),
                        metric=arguments.get("promotion_metric"), margin=arguments.get("promotion_margin"))
    check_settings(cfg.registry, k=arguments.get("k"), rounds=arguments.get("rounds"))


def backend_variant(host: str, backend: str | None = None) -> Variant:
    """The variant to send to ``host``, decided before anything is uploaded: the newest the server's version
    runs, or ``backend`` (refused when the server says it is too old for it). With ``backend`` given, a server
    that cannot be asked (a login page in front of it, say) gets that variant, with a warning."""
    try:
        version = server_version(host, headers=_auth_headers())
    except ValueError as exc:
        if not backend:
            raise ConfigError(f"{exc}; name the variant with --backend current (backend 2.16+) or compat (2.5+) "
                             "to send it anyway") from None
        log.warning("%s: sending the %r pipeline as asked, unchecked", exc, backend)
        return VARIANTS[backend]
    variant = VARIANTS[backend] if backend else variant_for(version)
    check_variant(variant, version)
    log.info("Kubeflow Pipelines %s at %s: sending the %r pipeline (backend %s+)", text(version), host,
             variant.name, text(variant.minimum))
    return variant


def _auth_headers() -> dict[str, str]:
    """A bearer token for the health request, as kfp.Client finds one in a pod (``KF_PIPELINES_SA_TOKEN_PATH``)."""
    path = Path(os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", "/var/run/secrets/kubeflow/pipelines/token"))
    return {"Authorization": f"Bearer {path.read_text().strip()}"} if path.is_file() else {}


def _compiled(tmp: str, profile: ClusterProfile | None, variant: Variant, preset: str) -> str:
    return str(compile_pipeline(Path(tmp) / "blendsign_pipeline.yaml", profile, variant, preset))


def submit(host: str, arguments: dict[str, Any], *, run_name: str | None = None, kfp_experiment: str = "blendsign",
           namespace: str | None = None, enable_caching: bool | None = None, profile: ClusterProfile | None = None,
           backend: str | None = None) -> str:
    """One run of the pipeline on ``host``; returns the run id."""
    _check(arguments)
    variant = backend_variant(host, backend)
    client = _client(host, namespace)
    with tempfile.TemporaryDirectory(prefix="blendsign-kfp-") as tmp:
        result = client.create_run_from_pipeline_package(
            _compiled(tmp, profile, variant, arguments.get("preset", "paper")), arguments=arguments,
            run_name=run_name, experiment_name=kfp_experiment, namespace=namespace, enable_caching=enable_caching)
    log.info("submitted run %s to %s", result.run_id, host)
    return str(result.run_id)


def schedule(host: str, cron: str, arguments: dict[str, Any], *, name: str = "blendsign-retraining",
             kfp_experiment: str = "blendsign", namespace: str | None = None, max_concurrency: int = 1,
             profile: ClusterProfile | None = None, backend: str | None = None) -> str:
    """The recurring run ``name`` of the pipeline on ``host`` (scheduled retraining); returns its id.

    A recurring run of that name in the experiment is replaced, not joined by a second one (KFP's API cannot
    update one): the old one is disabled, the new one created, then the old one deleted; if creating fails,
    the old one is enabled again. ``only_if_new_data`` defaults to true here: a run that finds the champion's
    dataset ends early.
    """
    arguments = {"only_if_new_data": True, **arguments}
    _check(arguments)
    cron = kfp_cron(cron)
    variant = backend_variant(host, backend)
    client = _client(host, namespace)
    experiment = client.create_experiment(name=kfp_experiment, namespace=namespace)
    same_name = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": name}]})
    listed = client.list_recurring_runs(experiment_id=experiment.experiment_id, filter=same_name, page_size=100)
    old = [r.recurring_run_id for r in (listed.recurring_runs or []) if r.display_name == name]
    for run_id in old:
        client.disable_recurring_run(run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="blendsign-kfp-") as tmp:
            job = client.create_recurring_run(
                experiment_id=experiment.experiment_id, job_name=name, cron_expression=cron, params=arguments,
                pipeline_package_path=_compiled(tmp, profile, variant, arguments.get("preset", "paper")),
                max_concurrency=max_concurrency, no_catchup=True)
    except Exception:
        for run_id in old:
            client.enable_recurring_run(run_id)
        raise
    for run_id in old:
        client.delete_recurring_run(run_id)
        log.info("replaced recurring run %s (%s)", run_id, name)
    log.info("scheduled %s on %s (%s)", name, host, cron)
    return str(job.recurring_run_id)
