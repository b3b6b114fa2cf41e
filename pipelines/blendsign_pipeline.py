"""The blendsign Kubeflow pipeline: the stages of ``blendsign run`` as pods.

snapshot → ingest → fuse → folds (cached on their inputs) → start_run (parent MLflow run) → check_new_data
→ if ``retrain``: ParallelFor over the training jobs (train_teacher → distill), which are the K folds plus,
with ``register_mode=refit``, the refit on all scans → Collected models → evaluate (the folds) → register
(the refit, or the fold ensemble); else: no_new_data (the run ends early, the champion stays).

Resources (GPU type and count, CPU and memory) are fixed when compiling (:class:`Resources`, options of
``blendsign pipeline compile``): kfp 2.17's local runner cannot resolve resource settings that come from
pipeline parameters inside a ParallelFor. Credentials come from one Kubernetes secret whose name is the
``credentials_secret`` parameter (keys: :data:`SECRET_KEYS`).

No ``from __future__ import annotations``: KFP reads the pipeline function's real annotations.
"""

from dataclasses import dataclass
from pathlib import Path

from components import stages
from kfp import compiler, dsl, kubernetes
from kfp.dsl.graph_component import GraphComponent

PIPELINE_NAME = "blendsign"
DEFAULT_YAML = Path(__file__).with_name("blendsign_pipeline.yaml")

SECRET_KEYS = (
    "AWS_ACCESS_KEY_ID",  # S3: data prefixes and the MLflow artifact store
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",  # S3-compatible store (MinIO, Ceph); absent for AWS itself
    "MLFLOW_TRACKING_URI",  # used when the tracking_uri parameter is empty
    "MLFLOW_TRACKING_USERNAME",  # MLflow server with basic auth
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "BLENDSIGN_PSEUDONYM_KEY",  # de-identification key: the same for every run, never stored with the data
)
"""Keys of the credentials secret, each exposed as the environment variable of the same name (all optional:
a key the secret lacks is simply not set)."""


@dataclass(frozen=True)
class Resources:
    """Per-task requests and limits, fixed at compile time."""

    gpu_type: str = "nvidia.com/gpu"  # accelerator resource of the training tasks
    gpus: int = 1  # per training task (0: CPU only); >1 needs the torchrun launcher (docs/pipeline.md)
    train_cpu: str = "16"  # 8 data-loader workers and the main process (bench_train_gpu: the loader sets the pace)
    train_memory: str = "32Gi"
    # OMP_NUM_THREADS of the GPU tasks' main process: torch would start a thread per core of the node.
    threads: int = 8
    data_cpu: str = "4"  # ingest, fuse, folds
    data_memory: str = "16Gi"
    light_cpu: str = "1"  # snapshot, start_run, check_new_data, no_new_data
    light_memory: str = "2Gi"
    retries: int = 2  # train_teacher and distill (a preempted GPU node, a transient store error); not register,
    # whose retry after a partial registration would register a second version


def _limits(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    return task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)


def build_pipeline(res: Resources | None = None) -> GraphComponent:
    """The pipeline with resources ``res`` (default: :class:`Resources`)."""
    res = res or Resources()

    def secret(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
        return kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env={k: k for k in SECRET_KEYS},
                                            optional=True)

    def light(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
        return secret(_limits(task, res.light_cpu, res.light_memory).set_caching_options(False), name)

    def data(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
        return secret(_limits(task, res.data_cpu, res.data_memory).set_caching_options(True), name)

    def gpu(task: dsl.PipelineTask, name: str, *, retry: bool) -> dsl.PipelineTask:
        task = _limits(task, res.train_cpu, res.train_memory).set_caching_options(False)
        task.set_env_variable("OMP_NUM_THREADS", str(res.threads))
        if res.gpus > 0:
            task.set_accelerator_type(res.gpu_type).set_accelerator_limit(res.gpus)
        if retry and res.retries > 0:
            task.set_retry(res.retries, backoff_duration="60s", backoff_factor=2.0)
        return secret(task, name)

    @dsl.pipeline(name=PIPELINE_NAME, description="Head-CT blend-sign classifier: DICOM to a champion-gated "
                  "registered model (ingest, fuse, folds, per-fold teacher + self-knowledge distillation, "
                  "cross-validated evaluation, registry)")
    def blendsign_pipeline(
        source_uri: str = "",
        annotations_uri: str = "",
        clinical_uri: str = "",
        preset: str = "paper",  # k = 0, rounds = -1: the preset's values
        k: int = 0,
        rounds: int = -1,
        tracking_uri: str = "",
        experiment: str = "blendsign",
        model_name: str = "blendsign",
        promotion_metric: str = "cv_auc_blend_sign",
        promotion_margin: float = 0.0,
        register_mode: str = "refit",
        only_if_new_data: bool = False,
        credentials_secret: str = "blendsign-credentials",
    ) -> str:
        snap = light(stages.snapshot(source_uri=source_uri, annotations_uri=annotations_uri,
                                     clinical_uri=clinical_uri), credentials_secret)
        tracking = {"tracking_uri": tracking_uri, "experiment": experiment}
        ing = data(stages.ingest(source_uri=source_uri, clinical_uri=clinical_uri, source_digest=snap.output,
                                 preset=preset, **tracking), credentials_secret)
        ingested = ing.outputs["dataset"]
        fus = data(stages.fuse(annotations_uri=annotations_uri, preset=preset, ingested=ingested, **tracking),
                   credentials_secret)
        labels = fus.outputs["labels"]
        fld = data(stages.folds(preset=preset, k=k, register_mode=register_mode, ingested=ingested,
                                labels=labels, **tracking), credentials_secret)
        split = fld.outputs["split"]
        start = light(stages.start_run(preset=preset, k=k, rounds=rounds, source_uri=source_uri,
                                       kfp_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, ingested=ingested, **tracking),
                      credentials_secret)
        run = start.outputs["run"]
        check = light(stages.check_new_data(model_name=model_name, only_if_new_data=only_if_new_data,
                                            ingested=ingested, run=run), credentials_secret)
        common = {"preset": preset, "k": k, "rounds": rounds, "ingested": ingested, "labels": labels,
                  "split": split, "run": run}
        with dsl.If(check.outputs["Output"] == "retrain", name="new-data"):
            with dsl.ParallelFor(fld.outputs["Output"], name="folds-loop") as fold:
                teacher = gpu(stages.train_teacher(fold=fold, **common), credentials_secret, retry=True)
                student = gpu(stages.distill(fold=fold, teacher=teacher.outputs["teacher"], **common),
                              credentials_secret, retry=True)
            ev = gpu(stages.evaluate(models=dsl.Collected(student.outputs["model"]), **common), credentials_secret,
                     retry=False)
            reg = gpu(stages.register(model_name=model_name, promotion_metric=promotion_metric,
                                      promotion_margin=promotion_margin, register_mode=register_mode,
                                      cv=ev.outputs["cv"],
                                      models=dsl.Collected(student.outputs["model"]), **common), credentials_secret,
                      retry=False)
        with dsl.Else(name="no-new-data"):
            skip = light(stages.no_new_data(decision=check.outputs["decision"], run=run), credentials_secret)
        return dsl.OneOf(reg.outputs["Output"], skip.output)

    return blendsign_pipeline


blendsign_pipeline = build_pipeline()


def compile_pipeline(output: str | Path = DEFAULT_YAML, res: Resources | None = None) -> Path:
    """Write the pipeline spec (YAML) to ``output``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(blendsign_pipeline if res is None else build_pipeline(res), str(output))
    return output
