"""One KFP v2 component per stage, each a thin wrapper over the library function the CLI calls.

Every component imports ``blendsign`` inside its body (KFP ships only the function's source to the pod)
and runs in the project image (``components.images``), which has the package installed; no logic lives
here. Data moves as directory artifacts (``Dataset``, ``Model``); reports as ``Markdown``; the parent
MLflow run as a small JSON ``Artifact`` (``blendsign.orchestration.RunRef``), an artifact rather than a
parameter because it enters the ParallelFor over folds.

No ``from __future__ import annotations`` here: KFP reads the real annotations.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import BASE_IMAGE, CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def snapshot(source_uri: str, annotations_uri: str, clinical_uri: str) -> str:
    """Digest of what lies under the input URIs: ingestion's cache key (new data, new digest)."""
    from blendsign.retrain import source_digest

    return source_digest(source_uri, annotations_uri, clinical_uri)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(source_uri: str, clinical_uri: str, source_digest: str, preset: str, tracking_uri: str, experiment: str,
           dataset: Output[Dataset], report: Output[Markdown]):
    """DICOM (local folder or s3:// prefix) → de-identified Parquet slices; the exclusion flow as report."""
    from contextlib import ExitStack
    from pathlib import Path

    from blendsign.config import load_preset
    from blendsign.orchestration import require_pseudonym_key
    from blendsign.pipeline import ingest_stage
    from blendsign.storage import local_input
    from blendsign.tracking import Tracker

    print(f"ingest {source_uri} (input snapshot {source_digest})")
    require_pseudonym_key(dataset.uri)
    with ExitStack() as stack:
        source = stack.enter_context(local_input(source_uri))
        clinical = stack.enter_context(local_input(clinical_uri)) if clinical_uri else None
        ingest_stage(load_preset(preset), source, dataset.path, clinical=clinical, progress=False,
                     tracker=Tracker.open(experiment, uri=tracking_uri or None))
    Path(report.path).write_text((Path(dataset.path) / "ingest_report.md").read_text())


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fuse(annotations_uri: str, preset: str, tracking_uri: str, experiment: str, ingested: Input[Dataset],
         labels: Output[Dataset], agreement: Output[Markdown]):
    """Readers' annotations (local or s3://) → majority-vote gold labels, fused boxes, Fleiss' κ."""
    import shutil
    from pathlib import Path

    from blendsign.config import load_preset
    from blendsign.pipeline import fuse_stage
    from blendsign.storage import local_input
    from blendsign.tracking import Tracker

    with local_input(annotations_uri) as annotations:
        fuse_stage(load_preset(preset), annotations, ingested.path, labels.path,
                   tracker=Tracker.open(experiment, uri=tracking_uri or None))
    shutil.copyfile(Path(labels.path) / "agreement.md", agreement.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def folds(preset: str, k: int, register_mode: str, tracking_uri: str, experiment: str, ingested: Input[Dataset],
          labels: Input[Dataset], split: Output[Dataset], table: Output[Markdown]) -> list:
    """Patient-level stratified K folds; returns the training jobs the ParallelFor iterates (folds, refit)."""
    import shutil
    from pathlib import Path

    from blendsign.orchestration import pipeline_config, training_jobs
    from blendsign.pipeline import folds_stage
    from blendsign.tracking import Tracker

    folds_stage(pipeline_config(preset, k=k), labels.path, split.path, ingest_dir=ingested.path,
                tracker=Tracker.open(experiment, uri=tracking_uri or None))
    shutil.copyfile(Path(split.path) / "folds.md", table.path)
    return training_jobs(split.path, register_mode)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_run(preset: str, k: int, rounds: int, tracking_uri: str, experiment: str, source_uri: str,
              kfp_run: str, ingested: Input[Dataset], run: Output[Artifact]):
    """Open the parent MLflow run (and its cross-validation child); pass them on as an artifact."""
    from blendsign.orchestration import open_pipeline_run, pipeline_config

    ref = open_pipeline_run(pipeline_config(preset, k=k, rounds=rounds), ingest_dir=ingested.path,
                            tracking_uri=tracking_uri, experiment=experiment,
                            tags={"source_uri": source_uri, "kfp_run": kfp_run})
    ref.write(run.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def check_new_data(model_name: str, only_if_new_data: bool, ingested: Input[Dataset], run: Input[Artifact],
                   decision: Output[Artifact], summary: Output[Markdown]) -> str:
    """``retrain`` or ``skip``: is this dataset's fingerprint new to the registered model?"""
    from pathlib import Path

    from blendsign.orchestration import RunRef
    from blendsign.retrain import decide, write_decision

    result = decide(ingested.path, client=RunRef.read(run.path).tracker().client, model_name=model_name,
                    only_if_new_data=only_if_new_data)
    write_decision(result, decision.path)
    Path(summary.path).write_text(result.markdown())
    return result.status


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_teacher(fold: int, preset: str, k: int, rounds: int, ingested: Input[Dataset], labels: Input[Dataset],
                  split: Input[Dataset], run: Input[Artifact], teacher: Output[Model]):
    """The teacher (distillation round 0) of a training job: a fold (trained on the other folds, validated
    on this one) or the refit on all scans (``fold`` = ``orchestration.REFIT``)."""
    from blendsign.distill import distill
    from blendsign.orchestration import RunRef, job_arguments, pipeline_config

    ref = RunRef.read(run.path)
    with ref.step("train_teacher") as tracker:
        distill(pipeline_config(preset, k=k, rounds=rounds), ingest_dir=ingested.path, labels_dir=labels.path,
                out_dir=teacher.path, rounds=0, tracker=tracker, progress=False,
                **job_arguments(ref, fold, split.path))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def distill(fold: int, preset: str, k: int, rounds: int, ingested: Input[Dataset], labels: Input[Dataset],
            split: Input[Dataset], run: Input[Artifact], teacher: Input[Model], model: Output[Model]):
    """Self-knowledge distillation rounds 1..R of a training job, starting from its teacher."""
    import shutil

    from blendsign.distill import distill
    from blendsign.orchestration import RunRef, job_arguments, pipeline_config

    ref = RunRef.read(run.path)
    shutil.copytree(teacher.path, model.path, dirs_exist_ok=True)  # round 0 is found finished, not retrained
    with ref.step("distill") as tracker:
        distill(pipeline_config(preset, k=k, rounds=rounds), ingest_dir=ingested.path, labels_dir=labels.path,
                out_dir=model.path, tracker=tracker, progress=False, **job_arguments(ref, fold, split.path))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(preset: str, k: int, rounds: int, ingested: Input[Dataset], labels: Input[Dataset],
             split: Input[Dataset], run: Input[Artifact], models: Input[list[Model]], cv: Output[Dataset],
             metrics: Output[Metrics], report: Output[Markdown]):
    """Every fold's final model on its held-out fold: metrics with CIs, figures (``cv/evaluation``)."""
    import shutil
    from pathlib import Path

    from blendsign.evaluate import evaluate
    from blendsign.orchestration import RunRef, cv_metrics, gather_fold_models, pipeline_config

    ref = RunRef.read(run.path)
    out = Path(cv.path)
    with ref.step("evaluate") as tracker:
        gather_fold_models([m.path for m in models], out / "models")
        evaluate(pipeline_config(preset, k=k, rounds=rounds), ingest_dir=ingested.path, labels_dir=labels.path,
                 folds_dir=split.path, models_dir=out / "models", out_dir=out / "evaluation", tracker=tracker,
                 run_id=ref.cv_run_id, progress=False)
    for name, value in cv_metrics(out / "evaluation").items():
        metrics.log_metric(name, value)
    shutil.copyfile(out / "evaluation" / "report.md", report.path)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register(preset: str, k: int, rounds: int, model_name: str, promotion_metric: str, promotion_margin: float,
             register_mode: str, ingested: Input[Dataset], labels: Input[Dataset], split: Input[Dataset],
             run: Input[Artifact], cv: Input[Dataset], models: Input[list[Model]], model: Output[Model],
             card: Output[Markdown]) -> str:
    """The refit trained in the loop (or the fold ensemble) registered behind the champion gate; returns the
    run record (JSON)."""
    import json
    import shutil
    from pathlib import Path

    from blendsign.orchestration import RunRef, finish_pipeline_run, pipeline_config
    from blendsign.pipeline import register_stage

    ref = RunRef.read(run.path)
    with ref.step("register") as tracker:
        registered = register_stage(pipeline_config(preset, k=k, rounds=rounds), cv_dir=cv.path,
                                    ingest_dir=ingested.path, labels_dir=labels.path, folds_dir=split.path,
                                    out_dir=model.path, tracker=tracker, parent_run_id=ref.parent_run_id,
                                    mode=register_mode, name=model_name, metric=promotion_metric,
                                    margin=promotion_margin, trained=[m.path for m in models], progress=False)
    shutil.copyfile(Path(model.path) / "model_card.md", card.path)
    record = finish_pipeline_run(ref, evaluation_dir=Path(cv.path) / "evaluation", registered=registered)
    return json.dumps({**record, "cv_uri": cv.uri})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def no_new_data(decision: Input[Artifact], run: Input[Artifact]) -> str:
    """The early end of a run without new data: the parent MLflow run says why; the champion stays."""
    import json

    from blendsign.orchestration import RunRef, end_skipped_run
    from blendsign.retrain import read_decision

    return json.dumps(end_skipped_run(RunRef.read(run.path), read_decision(decision.path)))


STAGES = {
    "ingest": ingest,
    "fuse": fuse,
    "folds": folds,
    "train_teacher": train_teacher,
    "distill": distill,
    "evaluate": evaluate,
    "register": register,
}
"""The seven stage components of issue 7, by stage name (helpers: snapshot, start_run, check_new_data,
no_new_data)."""
