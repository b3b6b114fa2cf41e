"""blendsign.run_tree: the pipeline run's MLflow tree, opened in one step, closed in another, ended by the exit
handler; and the on-disk formats the steps hand each other (fold exports, metrics.json, folds)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blendsign import CLASSES, METRICS
from blendsign.distill import export_final, gather
from blendsign.evaluate import EvalResult
from blendsign.folds import fold_ids
from blendsign.pipeline import REFIT, pipeline_config, training_jobs
from blendsign.retrain import RetrainDecision
from blendsign.run_tree import (
    RUN_TAG,
    RunRef,
    end_skipped_run,
    end_unfinished_runs,
    finish_pipeline_run,
    open_pipeline_run,
)
from blendsign.storage import write_json_atomic


def test_pipeline_config_applies_k_rounds_and_the_device() -> None:
    cfg = pipeline_config("ci", k=2, rounds=0, device="cuda")
    assert (cfg.preset, cfg.folds.k, cfg.distill.rounds, cfg.data.size, cfg.train.device) == ("ci", 2, 0, 64, "cuda")
    assert (pipeline_config("paper").folds.k, pipeline_config("paper").distill.rounds) == (5, 2)
    assert pipeline_config("ci", k=0, rounds=-1) == pipeline_config("ci")  # the pipeline's "preset's value"


def _distilled(folder: Path, name: str, rounds: int) -> Path:
    fold_dir = folder / name
    for r in range(rounds + 1):
        (fold_dir / f"round{r}").mkdir(parents=True)
        (fold_dir / f"round{r}" / "model.pt").write_bytes(b"%s r%d" % (name.encode(), r))
        (fold_dir / f"round{r}" / "last.pt").write_bytes(b"optimiser state")
    (fold_dir / "distill.json").write_text(json.dumps({"fold": name, "final_checkpoint": f"round{rounds}/model.pt"}))
    return fold_dir


def test_folds_jobs_and_the_exported_final_models(tmp_path: Path) -> None:
    pq.write_table(pa.table({"scan_id": ["a", "b", "c", "d"], "fold": [2, 0, 2, 1]}), tmp_path / "folds.parquet")
    assert fold_ids(tmp_path) == [0, 1, 2]
    assert training_jobs(tmp_path, "refit") == [0, 1, 2, REFIT]  # the refit trains beside the folds
    assert training_jobs(tmp_path, "fold-ensemble") == [0, 1, 2]
    sources = [_distilled(tmp_path / f"task{k}", f"fold{k}", 1).parent for k in (1, 0)]
    dest = gather(sources, tmp_path / "cv" / "models")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["fold0/distill.json", "fold0/round1/model.pt", "fold1/distill.json", "fold1/round1/model.pt"]
    assert gather(sources, tmp_path / "cv" / "models") == dest  # a re-run: the same files again
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == files
    with pytest.raises(ValueError, match="twice"):
        gather([sources[0], sources[0]], tmp_path / "again")
    with pytest.raises(FileNotFoundError, match="no finished training job fold2"):
        gather(sources, tmp_path / "none", names=["fold0", "fold2"])
    refit = _distilled(tmp_path / "task-refit", "all", 0).parent
    assert sorted(p.name for p in gather([*sources, refit], tmp_path / "eval").iterdir()) == ["fold0", "fold1"]
    only = gather([*sources, refit], tmp_path / "register", names=["all"])
    assert (only / "all" / "round0" / "model.pt").read_bytes() == b"all r0" and not (only / "fold0").exists()


def test_an_export_replaces_the_teachers(tmp_path: Path) -> None:
    teacher = _distilled(tmp_path / "teacher", "fold3", 0)
    export_final(teacher, tmp_path / "models")
    assert (tmp_path / "models" / "fold3" / "round0" / "model.pt").is_file()
    student = _distilled(tmp_path / "student", "fold3", 2)
    target = export_final(student, tmp_path / "models")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "distill.json", "round2/model.pt"]  # no earlier round, no optimiser state


def _evaluation(folder: Path) -> Path:
    cv = {f"{m}_{c}": [0.8, 0.1] for m in METRICS for c in CLASSES}
    cv["auc_non_ich"] = [float("nan"), float("nan")]
    write_json_atomic(folder / "metrics.json", {"per_fold": {"0": {}, "1": {}}, "cv": cv,
                                                "ci": {k: [0.7, 0.9] for k in cv}, "scan": {"auc_any_ich": 0.9}})
    return folder


def test_evaluation_from_its_folder(tmp_path: Path) -> None:
    ev = EvalResult.load(_evaluation(tmp_path / "evaluation"))
    text = (tmp_path / "evaluation" / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["cv"]["auc_non_ich"] == [None, None]  # strict JSON: null
    assert all(math.isnan(v) for v in ev.cv["auc_non_ich"])  # read back as NaN
    assert sorted(ev.per_fold) == [0, 1] and "0.800 ± 0.100 [0.700, 0.900]" in ev.summary()
    assert ev.cv_means()["cv_auc_blend_sign"] == 0.8 and "cv_auc_non_ich" not in ev.cv_means()  # NaN left out


def _open(tmp_path: Path, run_id: str = "kfp-run-1", **tags: str) -> RunRef:
    return open_pipeline_run(pipeline_config("ci"), fingerprint="f00d", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                             experiment="orch", run_id=run_id, work=str(tmp_path / "work" / run_id), tags=tags)


def test_parent_run_opened_in_one_step_closed_in_another(tmp_path: Path) -> None:
    ref = _open(tmp_path, source_uri="s3://bucket/dicom")
    ref.write(tmp_path / "run.json")
    assert RunRef.read(tmp_path / "run.json") == ref  # what the next pod reads
    client = ref.tracker().client
    parent, cv = client.get_run(ref.parent_run_id), client.get_run(ref.cv_run_id)
    assert parent.info.status == cv.info.status == "RUNNING"
    assert parent.data.tags["data_fingerprint"] == "f00d" and parent.data.tags["source_uri"] == "s3://bucket/dicom"
    assert parent.data.tags[RUN_TAG] == cv.data.tags[RUN_TAG] == "kfp-run-1"
    assert cv.data.tags["mlflow.parentRunId"] == ref.parent_run_id and parent.data.params["preset"] == "ci"
    with ref.tracker().run("fold0", parent_run_id=ref.cv_run_id) as fold:
        pass
    assert client.get_run(fold.run_id).data.tags[RUN_TAG] == "kfp-run-1"  # every run of the pipeline run
    assert ref.parent_run_id in ref.markdown() and f"{RUN_TAG} = kfp-run-1" in ref.markdown()
    served = replace(ref, tracking_uri="http://mlflow.mlops:5000/").markdown()  # a link back from the Kubeflow UI
    assert f"(http://mlflow.mlops:5000/#/experiments/{ref.experiment_id}/runs/{ref.parent_run_id})" in served

    registered = {"registered_model": "m", "model_version": "3", "alias": "challenger", "promoted": False,
                  "decision": "challenger: ...", "model_uri": "models:/m@champion", "version_uri": "models:/m/3"}
    record = finish_pipeline_run(ref, cv_metrics=EvalResult.load(_evaluation(tmp_path / "ev")).cv_means(),
                                 registered=registered)
    assert record["status"] == "registered" and record["parent_run_id"] == ref.parent_run_id
    assert record[RUN_TAG] == "kfp-run-1" and record["model_uri"] == "models:/m@champion"
    parent = client.get_run(ref.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["cv_auc_blend_sign"] == 0.8

    skipped_ref = _open(tmp_path, "kfp-run-2")
    decision = RetrainDecision(False, "no new data since champion v3", "f00d", "m", "3", "f00d")
    skipped = end_skipped_run(skipped_ref, decision)
    assert skipped["status"] == "skipped" and skipped["model_version"] == "3"
    run = client.get_run(skipped_ref.parent_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["retrain_decision"] == decision.reason
    assert client.get_run(skipped_ref.cv_run_id).info.lifecycle_stage == "deleted"


def test_a_failing_step_marks_the_parent_run_failed_and_a_finished_pipeline_overrules_it(tmp_path: Path) -> None:
    ref = _open(tmp_path)
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
    finish_pipeline_run(ref, cv_metrics={}, registered=registered)  # a retry of the step won
    assert client.get_run(ref.parent_run_id).info.status == "FINISHED"


@pytest.mark.parametrize(("state", "status"), [("CANCELED", "KILLED"), ("FAILED", "FAILED"), (None, "FAILED"),
                                               ("RUNNING", "FAILED"), ("COMPLETE", "FAILED")])
def test_the_exit_handler_ends_what_a_stopped_run_left_running(tmp_path: Path, state: str | None,
                                                               status: str) -> None:
    ref, other = _open(tmp_path, "stopped"), _open(tmp_path, "still-going")
    tracker = ref.tracker()
    with tracker.run("fold0", parent_run_id=ref.cv_run_id) as done:
        pass
    killed = tracker.client.create_run(tracker.experiment_id, run_name="fold1-round0",
                                       tags={RUN_TAG: "stopped", "mlflow.parentRunId": ref.cv_run_id})
    ended = end_unfinished_runs(ref.tracking_uri, "orch", "stopped", state)
    assert set(ended) == {ref.parent_run_id, ref.cv_run_id, killed.info.run_id}
    client = tracker.client
    for run_id in ended:
        run = client.get_run(run_id)
        assert run.info.status == status and "exit handler" in run.data.tags["ended_by"]
    assert client.get_run(done.run_id).info.status == "FINISHED"  # what ended on its own keeps its state
    assert client.get_run(other.parent_run_id).info.status == "RUNNING"  # another pipeline run is not touched
    assert end_unfinished_runs(ref.tracking_uri, "orch", "stopped", state) == []  # idempotent
    assert end_unfinished_runs(ref.tracking_uri, "no-such-experiment", "stopped") == []  # creates nothing
    assert client.get_experiment_by_name("no-such-experiment") is None


def test_end_runs_by_hand_for_a_run_whose_exit_handler_did_not_run(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from blendsign import cli

    ref = _open(tmp_path, "terminated")
    assert cli.main(["pipeline", "end-runs", "terminated", "--tracking-uri", ref.tracking_uri, "--experiment", "orch",
                     "--cancelled"]) == 0
    assert "ended 2 MLflow run(s) of pipeline run terminated" in capsys.readouterr().out
    assert ref.tracker().client.get_run(ref.parent_run_id).info.status == "KILLED"
