"""One KFP v2 component per pipeline step, each a thin wrapper over the ``blendsign.pipeline`` function that
``blendsign run`` calls too.

Every component imports ``blendsign`` inside its body (KFP ships only the function's source to the pod) and
runs in the project image (``blendsign.components.images``), which has the package installed; no logic lives
here. Data moves as directory artifacts (``Dataset``, ``Model``); the ingested dataset's manifest and report
as a small ``Artifact`` that the light steps read instead of the dataset; reports as ``Markdown`` and
``HTML``; the parent MLflow run as a small JSON ``Artifact`` (``blendsign.run_tree.RunRef``), an artifact
rather than a parameter because it enters the training loop.

No ``from __future__ import annotations`` here: KFP reads the real annotations.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from blendsign.components.images import BASE_IMAGE, CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def check_inputs(source_uri: str, annotations_uri: str, clinical_uri: str, preset: str, k: int, rounds: int,
                 promotion_metric: str, promotion_margin: float, register_mode: str, tracking_uri: str,
                 work_uri: str, report: Output[Markdown]) -> NamedTuple("Checked", clinical_uri=str, tracking_uri=str):
    """Refuse a run that would fail later (parameters, inputs, clinical list, key, tracking server, work prefix)."""
    from pathlib import Path

    from blendsign.pipeline import check_run

    checked = check_run(source=source_uri, annotations=annotations_uri, clinical=clinical_uri, preset=preset, k=k,
                        rounds=rounds, metric=promotion_metric, margin=promotion_margin, register_mode=register_mode,
                        tracking_uri=tracking_uri, work_uri=work_uri, on_cluster="://" in report.uri)
    Path(report.path).write_text(checked.markdown())
    return (checked.clinical, checked.tracking_uri)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def snapshot(source_uri: str, annotations_uri: str, clinical_uri: str) -> str:
    """Digest of what lies under the input URIs: ingestion's cache key (new data, new digest)."""
    from blendsign.pipeline import snapshot

    return snapshot(source_uri, annotations_uri, clinical_uri)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(source_uri: str, clinical_uri: str, source_digest: str, preset: str, tracking_uri: str, experiment: str,
           dataset: Output[Dataset], manifest: Output[Artifact], report: Output[Markdown]):
    """DICOM (local folder or s3:// prefix) → de-identified Parquet slices; the exclusion flow as report."""
    import shutil

    from blendsign.ingest import export_summary
    from blendsign.pipeline import ingest_step, open_tracker, pipeline_config

    print(f"ingest {source_uri} (input snapshot {source_digest})")
    result = ingest_step(pipeline_config(preset), source_uri, dataset.path, clinical=clinical_uri,
                         tracker=open_tracker(experiment, tracking_uri))
    export_summary(result.out, manifest.path)  # what the light steps read instead of the dataset
    shutil.copyfile(result.out / "ingest_report.md", report.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fuse(annotations_uri: str, preset: str, tracking_uri: str, experiment: str, ingested: Input[Dataset],
         labels: Output[Dataset], agreement: Output[Markdown]):
    """Readers' annotations (local or s3://) → majority-vote gold labels, fused boxes, Fleiss' κ."""
    import shutil
    from pathlib import Path

    from blendsign.pipeline import fuse_step, open_tracker, pipeline_config

    fuse_step(pipeline_config(preset), annotations_uri, ingested.path, labels.path,
              tracker=open_tracker(experiment, tracking_uri))
    shutil.copyfile(Path(labels.path) / "agreement.md", agreement.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def folds(preset: str, k: int, register_mode: str, tracking_uri: str, experiment: str, labels: Input[Dataset],
          manifest: Input[Artifact], split: Output[Dataset], table: Output[Markdown]) -> list[int]:
    """Patient-level stratified K folds; returns the training jobs the loop runs (the folds, then -1: the refit)."""
    import shutil
    from pathlib import Path

    from blendsign.pipeline import folds_step, open_tracker, pipeline_config, training_jobs

    folds_step(pipeline_config(preset, k=k), labels.path, split.path, manifest=manifest.path,
               tracker=open_tracker(experiment, tracking_uri))
    shutil.copyfile(Path(split.path) / "folds.md", table.path)
    return training_jobs(split.path, register_mode)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_run(preset: str, k: int, rounds: int, tracking_uri: str, experiment: str, work_uri: str, kfp_run_id: str,
              kfp_run_name: str, manifest: Input[Artifact], run: Output[Artifact], mlflow: Output[Markdown]):
    """Open the parent MLflow run (and its cross-validation child), tagged with this Kubeflow run's id; pass
    them on as an artifact, and say where they are."""
    from pathlib import Path

    from blendsign.pipeline import pipeline_config, start_run

    ref = start_run(pipeline_config(preset, k=k, rounds=rounds), manifest=manifest.path, tracking_uri=tracking_uri,
                    experiment=experiment, run_id=kfp_run_id, work_uri=work_uri,
                    tags={"kfp_run_id": kfp_run_id, "kfp_run_name": kfp_run_name, "orchestrator": "kubeflow"})
    ref.write(run.path)
    Path(mlflow.path).write_text(ref.markdown())


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def check_new_data(model_name: str, only_if_new_data: bool, manifest: Input[Artifact], run: Input[Artifact],
                   decision: Output[Artifact], summary: Output[Markdown]) -> str:
    """``retrain`` or ``skip``: is this dataset's fingerprint new to the registered model?"""
    from pathlib import Path

    from blendsign.pipeline import RunRef, check_new_data
    from blendsign.retrain import write_decision

    result = check_new_data(RunRef.read(run.path), manifest=manifest.path, model_name=model_name,
                            only_if_new_data=only_if_new_data)
    write_decision(result, decision.path)
    Path(summary.path).write_text(result.markdown())
    return result.status


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_teacher(job: int, preset: str, k: int, rounds: int, device: str, ingested: Input[Dataset],
                  labels: Input[Dataset], split: Input[Dataset], run: Input[Artifact], summary: Output[Markdown]):
    """The teacher (distillation round 0) of a training job: a fold (trained on the other folds, validated
    on this one) or the refit on all scans (``job`` = -1). Its checkpoints stay in the run's work folder,
    where ``distill`` continues."""
    from pathlib import Path

    from blendsign.pipeline import RunRef, job_markdown, pipeline_config, train_job

    result = train_job(pipeline_config(preset, k=k, rounds=rounds, device=device), RunRef.read(run.path), job,
                       ingest_dir=ingested.path, labels_dir=labels.path, folds_dir=split.path, rounds=0)
    Path(summary.path).write_text(job_markdown(job, result))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def distill(job: int, preset: str, k: int, rounds: int, device: str, ingested: Input[Dataset],
            labels: Input[Dataset], split: Input[Dataset], run: Input[Artifact], model: Output[Model],
            summary: Output[Markdown]):
    """Self-knowledge distillation rounds 1..R of a training job, from its teacher's checkpoint in the run's
    work folder; the final model (``distill.json`` and one ``model.pt``) as output."""
    from pathlib import Path

    from blendsign.pipeline import RunRef, job_markdown, job_metadata, pipeline_config, train_job

    result = train_job(pipeline_config(preset, k=k, rounds=rounds, device=device), RunRef.read(run.path), job,
                       ingest_dir=ingested.path, labels_dir=labels.path, folds_dir=split.path, export=model.path)
    model.metadata.update(job_metadata(job, result))
    Path(summary.path).write_text(job_markdown(job, result))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(preset: str, k: int, rounds: int, device: str, ingested: Input[Dataset], labels: Input[Dataset],
             split: Input[Dataset], run: Input[Artifact], models: Input[list[Model]], cv: Output[Dataset],
             metrics: Output[Metrics], report: Output[Markdown], report_html: Output[HTML],
             roc_non_ich: Output[ClassificationMetrics], roc_normal_ich: Output[ClassificationMetrics],
             roc_blend_sign: Output[ClassificationMetrics], confusion: Output[ClassificationMetrics]):
    """Every fold's final model (collected from the loop) on its held-out fold: metrics with CIs, figures,
    the HTML report, ROC curves and the confusion matrix for the Kubeflow UI."""
    from pathlib import Path

    from blendsign.pipeline import RunRef, evaluate_step, pipeline_config
    from blendsign.report import fill_kfp_outputs

    evaluate_step(pipeline_config(preset, k=k, rounds=rounds, device=device), RunRef.read(run.path),
                  ingest_dir=ingested.path, labels_dir=labels.path, folds_dir=split.path, out=cv.path,
                  model_sources=[m.path for m in models])
    fill_kfp_outputs(Path(cv.path) / "evaluation", metrics=metrics, html=report_html, markdown=report,
                     roc_non_ich=roc_non_ich, roc_normal_ich=roc_normal_ich, roc_blend_sign=roc_blend_sign,
                     confusion=confusion)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_from_work(preset: str, k: int, rounds: int, device: str, ingested: Input[Dataset],
                       labels: Input[Dataset], split: Input[Dataset], run: Input[Artifact], cv: Output[Dataset],
                       metrics: Output[Metrics], report: Output[Markdown], report_html: Output[HTML],
                       roc_non_ich: Output[ClassificationMetrics], roc_normal_ich: Output[ClassificationMetrics],
                       roc_blend_sign: Output[ClassificationMetrics], confusion: Output[ClassificationMetrics]):
    """``evaluate`` for backends without fan-in (before 2.14): the fold models are read from the run's work
    prefix, where each training job exported its final model."""
    from pathlib import Path

    from blendsign.pipeline import RunRef, evaluate_step, pipeline_config
    from blendsign.report import fill_kfp_outputs

    evaluate_step(pipeline_config(preset, k=k, rounds=rounds, device=device), RunRef.read(run.path),
                  ingest_dir=ingested.path, labels_dir=labels.path, folds_dir=split.path, out=cv.path)
    fill_kfp_outputs(Path(cv.path) / "evaluation", metrics=metrics, html=report_html, markdown=report,
                     roc_non_ich=roc_non_ich, roc_normal_ich=roc_normal_ich, roc_blend_sign=roc_blend_sign,
                     confusion=confusion)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(preset: str, k: int, rounds: int, model_name: str, promotion_metric: str, promotion_margin: float,
             register_mode: str, manifest: Input[Artifact], labels: Input[Dataset], run: Input[Artifact],
             cv: Input[Dataset], card: Output[Markdown]) -> str:
    """The refit trained in the loop (or the fold ensemble), read from the run's work prefix (only the models it
    ships), registered behind the champion gate; ends the parent MLflow run and returns the run record (JSON)."""
    import json

    from blendsign.pipeline import RunRef, pipeline_config, register_step

    record = register_step(pipeline_config(preset, k=k, rounds=rounds), RunRef.read(run.path), cv_dir=cv.path,
                           ingest_dir=manifest.path, labels_dir=labels.path, card_path=card.path, mode=register_mode,
                           name=model_name, metric=promotion_metric, margin=promotion_margin)
    return json.dumps({**record, "cv_uri": cv.uri})  # the artifact's URI (on a cluster: the object store)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def no_new_data(decision: Input[Artifact], run: Input[Artifact]) -> str:
    """The early end of a run without new data: the parent MLflow run says why; the champion stays."""
    import json

    from blendsign.pipeline import RunRef, no_new_data
    from blendsign.retrain import read_decision

    return json.dumps(no_new_data(RunRef.read(run.path), read_decision(decision.path)))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def end_run(tracking_uri: str, experiment: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """The exit handler: end the MLflow runs this Kubeflow run left RUNNING, with its final state."""
    from blendsign.pipeline import end_run

    end_run(tracking_uri=tracking_uri, experiment=experiment, run_id=kfp_run_id, state=status.state)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def end_run_without_status(tracking_uri: str, experiment: str, kfp_run_id: str):
    """The exit handler for backends that cannot pass the final status (before 2.14): what is still RUNNING
    at the end belongs to a step that did not finish, and ends FAILED."""
    from blendsign.pipeline import end_run

    end_run(tracking_uri=tracking_uri, experiment=experiment, run_id=kfp_run_id)


STAGES = {
    "ingest": ingest,
    "fuse": fuse,
    "folds": folds,
    "train_teacher": train_teacher,
    "distill": distill,
    "evaluate": evaluate,
    "register": register,
}
"""The seven stage components by stage name (helpers: check_inputs, snapshot, start_run, check_new_data,
no_new_data, end_run; variants for older backends: evaluate_from_work, end_run_without_status)."""
