"""blendsign.orchestration: the pipeline steps' shared parent MLflow run, fold list, gathered fold models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blendsign import CLASSES, METRICS
from blendsign.orchestration import (
    REFIT,
    RunRef,
    cv_metrics,
    end_skipped_run,
    finish_pipeline_run,
    fold_ids,
    gather_fold_models,
    job_arguments,
    load_evaluation,
    open_pipeline_run,
    pipeline_config,
    require_pseudonym_key,
    training_jobs,
)
from blendsign.retrain import RetrainDecision
from blendsign.storage import write_json_atomic


def test_pipeline_config_applies_k_and_rounds() -> None:
    cfg = pipeline_config("ci", k=2, rounds=0)
    assert (cfg.preset, cfg.folds.k, cfg.distill.rounds, cfg.data.size) == ("ci", 2, 0, 64)
    assert (pipeline_config("paper").folds.k, pipeline_config("paper").distill.rounds) == (5, 2)
    assert pipeline_config("ci", k=0, rounds=-1) == pipeline_config("ci")  # the pipeline's "preset's value"


def test_fold_ids_and_gathered_models(tmp_path: Path) -> None:
    pq.write_table(pa.table({"scan_id": ["a", "b", "c", "d"], "fold": [2, 0, 2, 1]}), tmp_path / "folds.parquet")
    assert fold_ids(tmp_path) == [0, 1, 2]
    assert training_jobs(tmp_path, "refit") == [0, 1, 2, REFIT]  # the refit trains beside the folds
    assert training_jobs(tmp_path, "fold-ensemble") == [0, 1, 2]
    sources = []
    for k in (1, 0):
        fold_dir = tmp_path / f"task{k}" / f"fold{k}"
        for r in (0, 1):
            (fold_dir / f"round{r}").mkdir(parents=True)
            (fold_dir / f"round{r}" / "model.pt").write_bytes(b"r%d" % r)
            (fold_dir / f"round{r}" / "last.pt").write_bytes(b"big")
        (fold_dir / "distill.json").write_text(json.dumps({"fold": k, "final_checkpoint": "round1/model.pt"}))
        sources.append(fold_dir.parent)
    dest = gather_fold_models(sources, tmp_path / "cv" / "models")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["fold0/distill.json", "fold0/round1/model.pt", "fold1/distill.json", "fold1/round1/model.pt"]
    assert gather_fold_models(sources, tmp_path / "cv" / "models") == dest  # a re-run: the same files again
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == files
    with pytest.raises(ValueError, match="twice"):
        gather_fold_models([sources[0], sources[0]], tmp_path / "again")
    with pytest.raises(FileNotFoundError):
        gather_fold_models([], tmp_path / "none")
    refit_dir = tmp_path / "task-refit" / "all"
    (refit_dir / "round0").mkdir(parents=True)
    (refit_dir / "round0" / "model.pt").write_bytes(b"refit")
    (refit_dir / "distill.json").write_text(json.dumps({"fold": None, "final_checkpoint": "round0/model.pt"}))
    collected = [*sources, refit_dir.parent]  # what the loop hands to evaluate and register
    assert sorted(p.name for p in gather_fold_models(collected, tmp_path / "eval").iterdir()) == ["fold0", "fold1"]
    refit = gather_fold_models(collected, tmp_path / "register", pattern="all") / "all" / "round0" / "model.pt"
    assert refit.read_bytes() == b"refit" and not (tmp_path / "register" / "fold0").exists()


def test_job_arguments_put_folds_under_cross_validation_and_the_refit_under_the_pipeline() -> None:
    ref = RunRef("sqlite:///x.db", "e", parent_run_id="P", cv_run_id="CV")
    assert job_arguments(ref, 2, "/split") == {"fold": 2, "folds_dir": "/split", "parent_run_id": "CV"}
    assert job_arguments(ref, REFIT, "/split") == {"fold": None, "folds_dir": None, "parent_run_id": "P"}


def _evaluation(folder: Path) -> Path:
    cv = {f"{m}_{c}": [0.8, 0.1] for m in METRICS for c in CLASSES}
    cv["auc_non_ich"] = [float("nan"), float("nan")]
    write_json_atomic(folder / "metrics.json", {"per_fold": {"0": {}, "1": {}}, "cv": cv,
                                                "ci": {k: [0.7, 0.9] for k in cv}, "scan": {"auc_any_ich": 0.9}})
    return folder


def test_evaluation_from_its_folder(tmp_path: Path) -> None:
    ev = load_evaluation(_evaluation(tmp_path / "evaluation"))
    text = (tmp_path / "evaluation" / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["cv"]["auc_non_ich"] == [None, None]  # strict JSON: null
    assert all(math.isnan(v) for v in ev.cv["auc_non_ich"])  # read back as NaN
    assert sorted(ev.per_fold) == [0, 1] and "0.800 ± 0.100 [0.700, 0.900]" in ev.summary()
    metrics = cv_metrics(tmp_path / "evaluation")
    assert metrics["cv_auc_blend_sign"] == 0.8 and "cv_auc_non_ich" not in metrics  # NaN left out


def test_parent_run_opened_in_one_step_closed_in_another(tmp_path: Path) -> None:
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    (ingest / "manifest.json").write_text(json.dumps({"dataset_fingerprint": "f00d"}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ref = open_pipeline_run(pipeline_config("ci"), ingest_dir=ingest, tracking_uri=uri, experiment="orch",
                            tags={"source_uri": "s3://bucket/dicom"})
    ref.write(tmp_path / "run.json")
    assert RunRef.read(tmp_path / "run.json") == ref  # what the next pod reads
    client = ref.tracker().client
    parent, cv = client.get_run(ref.parent_run_id), client.get_run(ref.cv_run_id)
    assert parent.info.status == cv.info.status == "RUNNING"
    assert parent.data.tags["data_fingerprint"] == "f00d" and parent.data.tags["source_uri"] == "s3://bucket/dicom"
    assert cv.data.tags["mlflow.parentRunId"] == ref.parent_run_id and parent.data.params["preset"] == "ci"

    registered = {"registered_model": "m", "model_version": "3", "alias": "challenger", "promoted": False,
                  "decision": "challenger: ...", "model_uri": "models:/m@champion", "version_uri": "models:/m/3"}
    record = finish_pipeline_run(ref, evaluation_dir=_evaluation(tmp_path / "evaluation"), registered=registered)
    assert record["status"] == "registered" and record["parent_run_id"] == ref.parent_run_id
    assert {"tracking_uri", "experiment", "parent_run_id", "registered_model", "model_version", "model_uri"} <= set(
        record)
    parent = client.get_run(ref.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["cv_auc_blend_sign"] == 0.8

    skipped_ref = open_pipeline_run(pipeline_config("ci"), ingest_dir=ingest, tracking_uri=uri, experiment="orch")
    decision = RetrainDecision(False, "no new data since champion v3", "f00d", "m", "3", "f00d")
    skipped = end_skipped_run(skipped_ref, decision)
    assert skipped["status"] == "skipped" and skipped["model_version"] == "3"
    assert skipped["model_uri"] == "models:/m@champion"
    run = client.get_run(skipped_ref.parent_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["retrain_decision"] == decision.reason
    assert client.get_run(skipped_ref.cv_run_id).info.lifecycle_stage == "deleted"


def test_a_failing_step_marks_the_parent_run_failed_and_a_finished_pipeline_overrules_it(tmp_path: Path) -> None:
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    (ingest / "manifest.json").write_text(json.dumps({"dataset_fingerprint": "f00d"}))
    ref = open_pipeline_run(pipeline_config("ci"), ingest_dir=ingest, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                            experiment="orch")
    client = ref.tracker().client
    with ref.step("evaluate") as tracker:
        assert tracker.experiment_name == "orch"
    assert client.get_run(ref.parent_run_id).info.status == "RUNNING"  # a step that succeeds changes nothing
    with pytest.raises(KeyError), ref.step("train_teacher"):
        raise KeyError("fold 3")
    parent = client.get_run(ref.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["failed_step"] == "train_teacher: KeyError"
    registered = {"registered_model": "m", "model_version": "1", "alias": "champion", "promoted": True,
                  "decision": "champion: first", "model_uri": "models:/m@champion", "version_uri": "models:/m/1"}
    finish_pipeline_run(ref, evaluation_dir=_evaluation(tmp_path / "evaluation"), registered=registered)  # retry won
    assert client.get_run(ref.parent_run_id).info.status == "FINISHED"


def test_a_cluster_ingest_needs_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    require_pseudonym_key("/tmp/kfp/blendsign-run/ingest/dataset")  # kfp.local: a key file beside it is fine
    with pytest.raises(ValueError, match="BLENDSIGN_PSEUDONYM_KEY"):
        require_pseudonym_key("minio://mlpipeline/v2/artifacts/blendsign/run/ingest/dataset")
    monkeypatch.setenv("BLENDSIGN_PSEUDONYM_KEY", "k" * 64)
    require_pseudonym_key("s3://bucket/pipeline-root/ingest/dataset")
