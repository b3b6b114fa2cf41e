"""blendsign.run_tree: the pipeline run's MLflow tree, opened in one step, closed in another, ended by the exit
handler."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from blendsign.evaluate import EvalResult
from blendsign.pipeline import pipeline_config
from blendsign.retrain import RetrainDecision
from blendsign.run_tree import (
    RUN_TAG,
    RunRef,
    end_skipped_run,
    end_unfinished_runs,
    finish_pipeline_run,
    open_pipeline_run,
)
from tests.conftest import evaluation_folder


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
    record = finish_pipeline_run(ref, cv_metrics=EvalResult.load(evaluation_folder(tmp_path / "ev")).cv_means(),
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
