"""blendsign.tracking against a real MLflow store: runs end FINISHED or FAILED, a resumed run follows its parent;
artifacts on a real S3-compatible server (moto's server mode on 127.0.0.1)."""

from __future__ import annotations

import http.server
import logging
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from blendsign.tracking import Tracker, check_server_version, finite, ui_command
from tests.conftest import ACCESS_KEY, BUCKET, SECRET_KEY, keys


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


def test_an_mlflow_2_server_is_refused_naming_both_versions(caplog: pytest.LogCaptureFixture) -> None:
    """A server that answers ``/version`` as MLflow 2.x does (no MLflow 2 server can run beside MLflow 3 here)."""
    import mlflow

    answers = {"/version": b"2.16.2"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = answers.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ValueError, match=rf"runs MLflow 2\.16\.2; blendsign \(MLflow client "
                                             rf"{re.escape(mlflow.__version__)}\) needs a server of MLflow 3"):
            Tracker.open(uri=uri)
        answers["/version"] = b"3.1.0"
        assert check_server_version(uri) == "3.1.0"
        answers["/version"] = b"2.0.0"
        assert check_server_version(uri) == "3.1.0"  # asked once per process
        del answers["/version"]
        other = uri + "/"
        assert check_server_version(other) is None and "cannot read its version (HTTPError)" in caplog.text
        assert check_server_version("sqlite:///x.db") is None
    finally:
        server.shutdown()


def test_mlflow_artifacts_on_s3(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    from blendsign.tracking import Tracker

    caplog.set_level(logging.INFO)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("BLENDSIGN_ARTIFACT_ROOT", f"s3://{BUCKET}/mlflow")
    tracker = Tracker.open("s3-artifacts", uri)
    assert tracker.client.get_experiment(tracker.experiment_id).artifact_location == \
        f"s3://{BUCKET}/mlflow/s3-artifacts"
    report = tmp_path / "report.json"
    report.write_text('{"auc": 0.9}\n')
    with tracker.run("artifact-on-s3") as run:
        run.log_artifact(report, "reports")
    key = f"mlflow/s3-artifacts/{run.run_id}/artifacts/reports/report.json"
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == report.read_bytes()

    # an experiment created with an explicit s3 artifact_location is used as is
    monkeypatch.delenv("BLENDSIGN_ARTIFACT_ROOT")
    tracker.client.create_experiment("explicit", artifact_location=f"s3://{BUCKET}/mlflow-explicit")
    explicit = Tracker.open("explicit", uri)
    with explicit.run("explicit") as run2:
        run2.log_artifact(report)
    assert f"mlflow-explicit/{run2.run_id}/artifacts/report.json" in keys(s3, "mlflow-explicit/")
    assert ACCESS_KEY not in caplog.text and SECRET_KEY not in caplog.text
