"""blendsign.pipeline: the steps the Kubeflow components and `blendsign run` share — the config of a run, its checks
before any data moves (against a real MLflow server and a real S3-compatible server), and training jobs whose
checkpoints survive the pod (a pre-empted job resumes from the work prefix, bit for bit)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from blendsign import checkpoint, storage
from blendsign.config import load_preset, override
from blendsign.deid import KEY_ENV
from blendsign.pipeline import (
    REFIT,
    check_run,
    job_label,
    job_markdown,
    job_models,
    pipeline_config,
    start_run,
    train_job,
)
from blendsign.storage import sync_up
from blendsign.train import train
from tests.conftest import BUCKET, EXPECTED_TREE, LOCAL_PRESET, run_tree

CHECK = {"preset": "ci", "metric": "cv_auc_blend_sign", "register_mode": "refit"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend), stopped after the module (or 120 s)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the MLflow server did not start")
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.fixture
def export(tmp_path: Path) -> dict[str, str]:
    """A DICOM export with its annotation CSV, and clinical.csv beside the DICOM folder (the documented layout)."""
    (tmp_path / "export" / "dicom").mkdir(parents=True)
    (tmp_path / "export" / "dicom" / "slice.dcm").write_bytes(b"\0" * 132)
    (tmp_path / "export" / "annotations.csv").write_text("x\n")
    (tmp_path / "export" / "clinical.csv").write_text("study_instance_uid,postoperative\n")
    return {"source": str(tmp_path / "export" / "dicom"), "annotations": str(tmp_path / "export" / "annotations.csv")}


def test_a_local_run_finds_the_clinical_list_beside_its_source(export: dict[str, str], tmp_path: Path) -> None:
    checked = check_run(**export, **CHECK, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", work_uri=str(tmp_path),
                        on_cluster=False)
    assert checked.clinical == str(tmp_path / "export" / "clinical.csv")
    assert any("found beside the source" in c for c in checked.checks) and "# Run inputs" in checked.markdown()
    explicit = check_run(**export, **CHECK, clinical=str(tmp_path / "export" / "clinical.csv"),
                         tracking_uri="sqlite:///x.db", work_uri=str(tmp_path), on_cluster=False)
    assert explicit.clinical == checked.clinical


@pytest.mark.parametrize(("change", "error"), [
    ({"source": ""}, r"missing input\(s\): source_uri"),
    ({"annotations": "/nowhere/annotations.csv"}, "annotation CSV /nowhere/annotations.csv not found"),
    ({"source": "/nowhere/dicom"}, "the DICOM source /nowhere/dicom is not a folder"),
    ({"source": "__annotations__"}, "is not a folder"),  # a file is no export
    ({"clinical": "/nowhere/clinical.csv"}, "clinical list /nowhere/clinical.csv not found"),
    ({"metric": "cv_auc_blendsign"}, "promotion metric 'cv_auc_blendsign' unknown"),
    ({"register_mode": "ensemble"}, "register mode must be one of"),
    ({"k": 1}, "k must be at least 2 folds"),
    ({"preset": "papr"}, "unknown preset 'papr'"),
])
def test_a_run_that_would_fail_later_is_refused_first(export: dict[str, str], tmp_path: Path,
                                                      change: dict[str, Any], error: str) -> None:
    args = {**export, **CHECK, "tracking_uri": "sqlite:///x.db", "work_uri": str(tmp_path), "on_cluster": False}
    if change.get("source") == "__annotations__":
        change = {"source": export["annotations"]}
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        check_run(**{**args, **change})


def test_on_a_cluster_every_pod_must_reach_the_same_tracking_server_and_work_prefix(
        export: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_server: str) -> None:
    cluster = {**export, **CHECK, "work_uri": "s3://bucket/work", "on_cluster": True}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(KEY_ENV, "k" * 64)
    with pytest.raises(ValueError, match="no MLflow tracking URI"):  # a pod-local SQLite file otherwise
        check_run(**cluster)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/mlflow.db")
    with pytest.raises(ValueError, match=r"'sqlite:////tmp/mlflow\.db' is not a server"):
        check_run(**cluster)
    with pytest.raises(ValueError, match="did not answer from here"):
        check_run(**cluster, tracking_uri=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(ValueError, match=r"MLflow server http://127\.0\.0\.1:\d+ did not") as exc:
        check_run(**cluster, tracking_uri=f"http://user:s3cret@127.0.0.1:{_free_port()}")
    assert "s3cret" not in str(exc.value)  # credentials in a URI are never echoed
    with pytest.raises(ValueError, match="work_uri must be an s3:// prefix on a cluster"):
        check_run(**{**cluster, "work_uri": str(tmp_path)}, tracking_uri=mlflow_server)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"{KEY_ENV} is not set"):
        check_run(**cluster, tracking_uri=mlflow_server)


def test_a_real_tracking_server_passes(export: dict[str, str], tmp_path: Path, mlflow_server: str) -> None:
    checked = check_run(**export, **CHECK, tracking_uri=mlflow_server, work_uri=str(tmp_path), on_cluster=False)
    assert checked.tracking_uri == mlflow_server
    import mlflow

    assert f"MLflow server {mlflow_server}: reachable, credentials accepted, MLflow {mlflow.__version__}" in \
        checked.checks


def test_s3_inputs_clinical_list_and_work_prefix(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 mlflow_server: str) -> None:
    for key, body in (("export/dicom/a.dcm", b"\0" * 132), ("export/annotations.csv", b"x\n"),
                      ("export/clinical.csv", b"study_instance_uid,postoperative\n")):
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    monkeypatch.setenv(KEY_ENV, "k" * 64)
    args = {"source": f"s3://{BUCKET}/export/dicom/", "annotations": f"s3://{BUCKET}/export/annotations.csv",
            **CHECK, "tracking_uri": mlflow_server, "on_cluster": True}
    checked = check_run(**args, work_uri=f"s3://{BUCKET}/work/")
    assert checked.clinical == f"s3://{BUCKET}/export/clinical.csv"  # as the CLI's ingest finds it
    assert f"work prefix s3://{BUCKET}/work/: writable" in checked.checks
    assert not storage.exists(f"s3://{BUCKET}/work/")  # the probe leaves nothing behind
    with pytest.raises(ValueError, match="cannot write to the work prefix s3://no-such-bucket/work"):
        check_run(**args, work_uri="s3://no-such-bucket/work")


def test_job_labels() -> None:
    assert job_label(2) == "fold 2" and job_label(REFIT) == "refit"


@pytest.mark.slow
def test_a_preempted_training_job_resumes_from_the_work_prefix_bit_for_bit(
        s3: Any, cohort: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The training pod of fold 0 was pre-empted after epoch 1: its checkpoint reached the run's work prefix.
    The retried pod finds it there and trains epoch 2 only; the result is the uninterrupted run's, exactly."""
    monkeypatch.chdir(tmp_path)
    cfg = override(load_preset("ci"), distill={"rounds": 0})
    dirs = {"ingest_dir": cohort["ingest"], "labels_dir": cohort["labels"], "folds_dir": cohort["folds"]}
    ref = start_run(cfg, manifest=cohort["ingest"], tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                    experiment="durable", run_id="kfp-run-7", work_uri=f"s3://{BUCKET}/work")
    assert ref.work == f"s3://{BUCKET}/work/kfp-run-7"
    train(cfg, **dirs, fold=0, out_dir=tmp_path / "preempted" / "fold0" / "round0", stop_after_epochs=1,
          progress=False)
    sync_up(tmp_path / "preempted" / "fold0", f"{ref.work}/jobs/fold0", marker=False)
    pushes: list[str] = []
    real_sync_up = storage.sync_up
    monkeypatch.setattr(storage, "sync_up", lambda local, uri, **kw: (pushes.append(str(uri)),
                                                                      real_sync_up(local, uri, **kw))[1])
    with caplog.at_level(logging.INFO, logger="blendsign.train"):
        result = train_job(cfg, ref, 0, **dirs, progress=False)
    assert "resuming" in caplog.text and "at epoch 2 of 2" in caplog.text
    assert result.final.epochs == 2
    assert pushes.count(f"{ref.work}/jobs/fold0") >= 2  # after the epoch, and when the job ended
    straight = train(cfg, **dirs, fold=0, out_dir=tmp_path / "straight", progress=False)
    with storage.local_input(f"{ref.work}/jobs/fold0/round0/model.pt") as resumed:
        a = checkpoint.load(resumed)["model"]
    b = checkpoint.load(straight.checkpoint)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    md = job_markdown(0, result)
    assert md.startswith("# fold 0") and "held-out fold: 0" in md

    with job_models(ref, [0]) as found:  # what evaluate reads on backends without fan-in
        assert sorted(p.name for p in (found / "fold0").rglob("*") if p.is_file()) == ["distill.json", "model.pt"]
    unfinished = "fold1: no finished model in the run's work prefix"  # fold 1 never finished: refused
    with pytest.raises(FileNotFoundError, match=unfinished), job_models(ref, [0, 1]):
        pass
    shutil.rmtree(tmp_path / "preempted")





@pytest.mark.slow
def test_a_second_run_on_new_scans_compares_with_the_champion_on_them(
        cohort: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run 1 registers a champion on the cohort; run 2 adds scans it never saw: evaluate scores the champion on
    exactly those, and the gate's decision says it compared the two there."""
    from dataclasses import replace

    import mlflow

    from blendsign.head_to_head import HeadToHead
    from blendsign.ingest import read_manifest
    from blendsign.pipeline import run_pipeline
    from blendsign.synth import synthesize
    from blendsign.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    first_src = cohort["root"] / "src"
    more = tmp_path / "more"
    synthesize(more, replace(load_preset("ci").synth, scans=6, class_ratio=(3.0, 2.0, 1.0), seed=11),
               progress=False)
    both = tmp_path / "both"
    shutil.copytree(first_src / "dicom", both / "dicom" / "a")
    shutil.copytree(more / "dicom", both / "dicom" / "b")
    for name in ("annotations.csv", "clinical.csv"):
        head, *rows = (first_src / name).read_text().splitlines()
        (both / name).write_text("\n".join([head, *rows, *(more / name).read_text().splitlines()[1:]]) + "\n")
    cfg = override(load_preset(str(LOCAL_PRESET)), folds={"k": 2}, distill={"rounds": 1})
    tracker = Tracker.open("h2h", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    common = {"work_dir": tmp_path / "work", "tracker": tracker, "model_name": "h2h", "progress": False,
              "register_mode": "fold-ensemble"}
    first = run_pipeline(cfg, source=first_src / "dicom", annotations=first_src / "annotations.csv", **common)
    assert first.record["promoted"] is True and first.record["model_version"] == "1"
    seen = {s["scan_id"] for s in read_manifest(tmp_path / "work" / "ingest")["scans"]}
    second = run_pipeline(cfg, source=both / "dicom", annotations=both / "annotations.csv", **common)

    h2h = HeadToHead.read(tmp_path / "work" / "cv" / "evaluation")
    assert h2h is not None and h2h.reason == "" and h2h.champion_version == "1"
    new = {s["scan_id"] for s in read_manifest(tmp_path / "work" / "ingest")["scans"]} - seen
    assert 0 < h2h.scans <= len(new) and h2h.slices > 0  # the labelled ones of the new scans
    assert h2h.values("cv_auc_blend_sign") is not None  # blend sign and other slices among the new scans
    assert f"both on the {h2h.scans} scans ({h2h.slices} slices) of this dataset that v1 never trained on" in \
        second.record["decision"], second.record["decision"]
    scans = mlflow.artifacts.download_artifacts(
        run_id=tracker.client.get_model_version("h2h", "2").run_id, artifact_path="registry/training_scans.json",
        dst_path=str(tmp_path / "dl"), tracking_uri=tracker.uri)
    assert set(json.loads(Path(scans).read_text())["scans"]) == seen | new


@pytest.mark.slow
def test_blendsign_run_builds_the_same_run_tree_as_the_kubeflow_pipeline(
        cohort: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`blendsign run` (one process) chains the same steps as the Kubeflow pipeline, so it leaves the same MLflow
    tree (tests/test_pipeline_kfp.py checks the kfp.local run against EXPECTED_TREE too), and nothing RUNNING."""
    from blendsign.pipeline import run_pipeline
    from blendsign.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    src = cohort["root"] / "src"
    cfg = override(load_preset(str(LOCAL_PRESET)), folds={"k": 2}, distill={"rounds": 1})
    tracker = Tracker.open("one-process", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = run_pipeline(cfg, work_dir=tmp_path / "work", source=src / "dicom", annotations=src / "annotations.csv",
                          clinical=src / "clinical.csv", tracker=tracker, model_name="one-process", progress=False)
    assert result.record["status"] == "registered"
    assert run_tree(tracker.uri, "one-process", result.record["parent_run_id"]) == {
        "tree": EXPECTED_TREE, "statuses": {"FINISHED"}}
    assert json.loads((tmp_path / ".blendsign" / "last_run.json").read_text()) == result.record
    assert sorted(p.name for p in (tmp_path / "work" / "models").iterdir()) == ["all", "fold0", "fold1"]


def test_pipeline_config_applies_k_rounds_and_the_device() -> None:
    cfg = pipeline_config("ci", k=2, rounds=0, device="cuda")
    assert (cfg.preset, cfg.folds.k, cfg.distill.rounds, cfg.data.size, cfg.train.device) == ("ci", 2, 0, 64, "cuda")
    assert (pipeline_config("paper").folds.k, pipeline_config("paper").distill.rounds) == (5, 2)
    assert pipeline_config("ci", k=0, rounds=-1) == pipeline_config("ci")  # the pipeline's "preset's value"
