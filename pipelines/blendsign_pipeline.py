"""The blendsign Kubeflow pipeline: the steps of ``blendsign run`` as pods, wired here and nowhere else.

Exit handler (end_run) around: check_inputs → snapshot → ingest → fuse → folds (cached on their inputs) →
start_run (parent MLflow run) → check_new_data → if ``retrain``: a loop over the training jobs (train_teacher →
distill; the K folds and, with ``register_mode=refit``, the refit on all scans) → evaluate (the folds) →
register (the refit, or the fold ensemble); else: no_new_data (the run ends early, the champion stays).

Pods are set by a cluster profile (``profile.py``: resources, placement, timeouts, retries, images), the
``/dev/shm`` of the loader tasks by the preset the pipeline is compiled for, the backend features by the
variant (``backends.py``). Credentials come from one Kubernetes secret, named by the ``credentials_secret``
parameter and mounted as files (keys: ``blendsign.credentials.KEYS``).

No ``from __future__ import annotations``: KFP reads the pipeline function's real annotations.
"""

from functools import reduce
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes
from kfp.dsl.graph_component import GraphComponent

from blendsign.components import stages
from blendsign.components.images import BASE_IMAGE, CPU_IMAGE
from blendsign.config import Config, load_preset
from blendsign.credentials import DIR_ENV
from blendsign.pipelines.backends import DEFAULT_VARIANT, VARIANTS, Variant
from blendsign.pipelines.profile import ClusterProfile, TaskProfile
from blendsign.tracking import IMAGE_ENV

PIPELINE_NAME = "blendsign"
CREDENTIALS_DIR = "/etc/blendsign/credentials"
SCRATCH_DIR = "/scratch"
COMMITTED = {"current": Path(__file__).with_name("blendsign_pipeline.yaml"),
             "compat": Path(__file__).with_name("blendsign_pipeline_kfp2.5.yaml")}
"""The compiled YAMLs kept in the repository (``make pipelines``): default profile, ``paper`` preset."""

DESCRIPTION = ("Head-CT blend-sign classifier: DICOM to a champion-gated registered model (ingest, label fusion, "
               "patient-level folds, per-fold teacher + repeated self-knowledge distillation, cross-validated "
               "evaluation with ROC, confusion matrix and an HTML report, MLflow registry). docs/pipeline.md")


RUN_SETTINGS = {"experiment": "tracking.experiment", "model_name": "registry.model_name",
                "promotion_metric": "registry.promotion_metric", "promotion_margin": "registry.promotion_margin",
                "register_mode": "registry.mode"}
"""The pipeline parameters that carry config fields (``section.field``) beside ``k`` and ``rounds``; the pods read
every other field from the preset."""


def run_settings(cfg: Config) -> dict[str, Any]:
    """:data:`RUN_SETTINGS`' parameters with ``cfg``'s values."""
    return {param: reduce(getattr, key.split("."), cfg) for param, key in RUN_SETTINGS.items()}


def _shm_size(cfg: Config) -> str:
    """``/dev/shm`` for the loader tasks of ``cfg`` (``blendsign.data.shared_memory_bytes``), in MiB."""
    from blendsign.data import shared_memory_bytes

    mib = -(-shared_memory_bytes(cfg.data, cfg.train.batch_size) // 2**20)
    return f"{max(mib, 64)}Mi"


def build_pipeline(profile: ClusterProfile | None = None, variant: Variant | str = DEFAULT_VARIANT,
                   preset: str = "paper", *, local: bool = False) -> GraphComponent:
    """The pipeline for ``profile`` (default: :class:`ClusterProfile`), ``variant`` (``current`` or ``compat``)
    and ``preset`` (the ``preset`` parameter's default; its config sizes ``/dev/shm`` and gives the
    :data:`RUN_SETTINGS` parameters their defaults). ``local``: for kfp.local, which runs every task in this
    environment (no image is recorded on the MLflow runs)."""
    profile = profile or ClusterProfile()
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    gpu_image, cpu_image = profile.image or BASE_IMAGE, profile.cpu_image or CPU_IMAGE
    if profile.image and not profile.cpu_image:
        cpu_image = f"{profile.image}-cpu" if "@" not in profile.image else profile.image
    cfg = load_preset(preset)
    shm, defaults = _shm_size(cfg), run_settings(cfg)

    def pod(task: dsl.PipelineTask, cls: str, secret: Any, *, loader: bool = False,
            name: str = "", cache: bool = False) -> dsl.PipelineTask:
        t: TaskProfile = profile.task(cls)
        image = gpu_image if t.gpus else cpu_image
        task.set_container_image(image)
        task.set_cpu_request(t.cpu).set_memory_request(t.memory).set_memory_limit(t.memory)
        if t.cpu_limit:
            task.set_cpu_limit(t.cpu_limit)
        if t.gpus:
            task.set_accelerator_type(t.gpu_resource).set_accelerator_limit(t.gpus)
        task.set_caching_options(cache)
        task.set_env_variable("OMP_NUM_THREADS", str(t.omp_threads))
        task.set_env_variable(DIR_ENV, CREDENTIALS_DIR)
        if not local:
            task.set_env_variable(IMAGE_ENV, image)
        kubernetes.use_secret_as_volume(task, secret_name=secret, mount_path=CREDENTIALS_DIR, optional=True)
        kubernetes.set_timeout(task, t.timeout_seconds)
        for key, value in t.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for tol in t.tolerations:
            kubernetes.add_toleration(task, key=tol.key or None, operator=tol.operator, value=tol.value or None,
                                      effect=tol.effect or None, toleration_seconds=tol.seconds)
        if t.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, list(t.image_pull_secrets))
        if t.image_pull_policy:
            kubernetes.set_image_pull_policy(task, t.image_pull_policy)
        if t.scratch:
            kubernetes.add_ephemeral_volume(task, volume_name="scratch", mount_path=SCRATCH_DIR,
                                            access_modes=["ReadWriteOnce"], size=t.scratch,
                                            storage_class_name=t.scratch_storage_class or None)
            task.set_env_variable("TMPDIR", SCRATCH_DIR)
        if loader:  # DataLoader workers pass batches through shared memory; the runtime's default is 64 MiB
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=shm)
        if t.retries:
            task.set_retry(t.retries, backoff_duration=t.retry_backoff, backoff_factor=2.0,
                           backoff_max_duration=t.retry_window)
        if name and variant.display_names:
            task.set_display_name(name)
        return task

    train_device = "cuda" if profile.train.gpus else "cpu"
    eval_device = "cuda" if profile.evaluate.gpus else "cpu"

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def blendsign_pipeline(
        source_uri: str,
        annotations_uri: str,
        work_uri: str = "",
        clinical_uri: str = "",
        preset: str = preset,
        k: int = 0,
        rounds: int = -1,
        tracking_uri: str = "",
        experiment: str = defaults["experiment"],
        model_name: str = defaults["model_name"],
        promotion_metric: str = defaults["promotion_metric"],
        promotion_margin: float = defaults["promotion_margin"],
        register_mode: str = defaults["register_mode"],
        only_if_new_data: bool = False,
        credentials_secret: str = "blendsign-credentials",
    ):
        """Train, evaluate and register the blend-sign model on one DICOM export.

        Args:
            source_uri: The DICOM export: an s3:// prefix (or a folder inside the image or a mounted volume).
            annotations_uri: The readers' annotation CSV (native format, see README), s3:// or a path.
            work_uri: An s3:// prefix for this run's training checkpoints and exported models (required on a
                cluster: a retried or pre-empted training pod resumes from there).
            clinical_uri: clinical.csv with the postoperative studies to exclude; empty: found in or beside the
                source, else no postoperative exclusion.
            preset: paper, demo, ci, or a site TOML inside the image (configs/); /dev/shm is sized for the
                preset the pipeline was compiled with.
            k: Cross-validation folds (0: the preset's; the paper's 5).
            rounds: Self-knowledge distillation rounds after the teacher (-1: the preset's; the paper's 2).
            tracking_uri: The MLflow tracking server (http(s)://); empty: MLFLOW_TRACKING_URI from the secret.
            experiment: The MLflow experiment.
            model_name: The registered model in the MLflow registry.
            promotion_metric: The champion gate's metric, cv_<metric>_<class> (e.g. cv_auc_blend_sign).
            promotion_margin: A new version becomes champion only if it beats the champion by more than this.
            register_mode: refit (retrain on all scans, beside the folds) or fold-ensemble (the K fold models).
            only_if_new_data: End early, training nothing, when the registry already holds this dataset.
            credentials_secret: The Kubernetes secret with S3, MLflow and pseudonym-key credentials.
        """
        secret = credentials_secret
        if variant.exit_status:
            exit_task = stages.end_run(tracking_uri=tracking_uri, experiment=experiment,
                                       kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        else:
            exit_task = stages.end_run_without_status(tracking_uri=tracking_uri, experiment=experiment,
                                                      kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        pod(exit_task, "light", secret, name="end MLflow runs")
        named = variant.display_names  # 2.5.0 keys tasks by display name: the compat variant names nothing
        with dsl.ExitHandler(exit_task, name="pipeline" if named else None):
            checked = pod(stages.check_inputs(
                source_uri=source_uri, annotations_uri=annotations_uri, clinical_uri=clinical_uri, preset=preset,
                k=k, rounds=rounds, promotion_metric=promotion_metric, promotion_margin=promotion_margin,
                register_mode=register_mode, tracking_uri=tracking_uri, work_uri=work_uri), "light", secret,
                name="check inputs")
            clinical, tracking = checked.outputs["clinical_uri"], checked.outputs["tracking_uri"]
            snap = pod(stages.snapshot(source_uri=source_uri, annotations_uri=annotations_uri,
                                       clinical_uri=clinical), "light", secret, name="snapshot inputs")
            ing = pod(stages.ingest(source_uri=source_uri, clinical_uri=clinical, source_digest=snap.output,
                                    preset=preset, tracking_uri=tracking, experiment=experiment), "data", secret,
                      name="ingest DICOM", cache=True)
            manifest = ing.outputs["manifest"]
            fus = pod(stages.fuse(annotations_uri=annotations_uri, preset=preset, ingested=ing.outputs["dataset"],
                                  tracking_uri=tracking, experiment=experiment), "data", secret,
                      name="fuse labels", cache=True)
            fld = pod(stages.folds(preset=preset, k=k, register_mode=register_mode, labels=fus.outputs["labels"],
                                   manifest=manifest, tracking_uri=tracking, experiment=experiment), "data", secret,
                      name="patient folds", cache=True)
            start = pod(stages.start_run(preset=preset, k=k, rounds=rounds, tracking_uri=tracking,
                                         experiment=experiment, work_uri=work_uri,
                                         kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                         kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, manifest=manifest),
                        "light", secret, name="start MLflow run")
            run = start.outputs["run"]
            check = pod(stages.check_new_data(model_name=model_name, only_if_new_data=only_if_new_data,
                                              manifest=manifest, run=run), "light", secret, name="new data?")
            data = {"preset": preset, "k": k, "rounds": rounds, "ingested": ing.outputs["dataset"],
                    "labels": fus.outputs["labels"], "split": fld.outputs["split"], "run": run}
            with dsl.If(check.outputs["Output"] == "retrain", name="new data" if named else None):
                loop = {"name": "training jobs: folds, then the refit"} if named else {}
                with dsl.ParallelFor(fld.outputs["Output"], parallelism=profile.parallelism, **loop) as job:
                    teacher = pod(stages.train_teacher(job=job, device=train_device, **data), "train", secret,
                                  loader=True, name="teacher")
                    student = pod(stages.distill(job=job, device=train_device, **data), "train", secret,
                                  loader=True, name="students").after(teacher)
                registry = {"preset": preset, "k": k, "rounds": rounds, "model_name": model_name,
                            "promotion_metric": promotion_metric, "promotion_margin": promotion_margin,
                            "register_mode": register_mode, "manifest": manifest, "labels": fus.outputs["labels"],
                            "run": run}
                if variant.fan_in:
                    ev = stages.evaluate(device=eval_device, models=dsl.Collected(student.outputs["model"]), **data)
                else:  # no fan-in before 2.14: wait for the loop, read the models from the run's work prefix
                    ev = stages.evaluate_from_work(device=eval_device, **data).after(student)
                pod(ev, "evaluate", secret, loader=True, name="evaluate")
                # the models it ships (the refit, or the folds) from the run's work prefix: nothing else moves
                pod(stages.register(cv=ev.outputs["cv"], **registry), "register", secret, name="register")
            with dsl.Else(name="no new data" if named else None):
                pod(stages.no_new_data(decision=check.outputs["decision"], run=run), "light", secret,
                    name="no new data")

    return blendsign_pipeline


def compile_pipeline(output: str | Path, profile: ClusterProfile | None = None,
                     variant: Variant | str = DEFAULT_VARIANT, preset: str = "paper") -> Path:
    """Write the pipeline spec (YAML) to ``output``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(profile, variant, preset), str(output))
    return output
