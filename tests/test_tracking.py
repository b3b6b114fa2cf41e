"""blendsign.tracking against a real MLflow store: runs end FINISHED or FAILED, a resumed run follows its parent."""

from __future__ import annotations

from pathlib import Path

import pytest

from blendsign.tracking import Tracker, finite, ui_command


def test_runs_end_with_their_outcome_and_resume_under_a_new_parent(tmp_path: Path) -> None:
    tracker = Tracker.open("test-tracking", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = tracker.client
    with tracker.run("cv-1") as first_parent, tracker.run("fold0", parent_run_id=first_parent.run_id) as fold:
        pass
    assert client.get_run(fold.run_id).info.status == "FINISHED"
    with pytest.raises(RuntimeError), tracker.run("broken"):
        raise RuntimeError("boom")
    broken = client.search_runs([tracker.experiment_id], "attributes.run_name = 'broken'")[0]
    assert broken.info.status == "FAILED"
    # cross-validation re-run: a new parent resumes the fold run, which moves under it
    with tracker.run("cv-2") as second_parent, \
            tracker.run("fold0", parent_run_id=second_parent.run_id, run_id=fold.run_id) as resumed:
        assert client.get_run(fold.run_id).info.status == "RUNNING"
    assert resumed.run_id == fold.run_id
    assert client.get_run(fold.run_id).data.tags["mlflow.parentRunId"] == second_parent.run_id
    assert client.get_run(fold.run_id).info.status == "FINISHED"


def test_finite_drops_what_mlflow_cannot_store() -> None:
    assert finite({"a": 1, "b": float("nan"), "c": float("inf"), "d": None, "e": 0.5}) == {"a": 1.0, "e": 0.5}


def test_ui_command_points_at_the_store_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    own = f"sqlite:///{tmp_path / '.blendsign' / 'mlflow.db'}"
    assert ui_command(own) == f"mlflow ui --host 127.0.0.1 --backend-store-uri {own}"  # no checkout here
    (tmp_path / "Makefile").write_text("mlflow-ui: x\n")
    assert ui_command(own) == "make mlflow-ui"
    assert ui_command("http://mlflow:5000").startswith("open http://mlflow:5000")
