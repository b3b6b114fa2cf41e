"""The Kubeflow pipeline: compiled spec, committed YAML, thin components, submit/schedule against a recording
HTTP server, and (slow) the whole pipeline on this machine with kfp.local."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pydicom
import pytest
import yaml
from components import BASE_IMAGE, CPU_IMAGE, STAGES, stages
from pipelines import launch
from pipelines.blendsign_pipeline import DEFAULT_YAML, SECRET_KEYS, Resources, compile_pipeline

from blendsign import cli
from blendsign import pipeline as lib_pipeline

ROOT = Path(__file__).resolve().parents[1]
GPU_EXECUTORS = {"exec-train-teacher", "exec-distill", "exec-evaluate", "exec-register"}
PARAMETERS = {"source_uri", "annotations_uri", "clinical_uri", "preset", "k", "rounds", "tracking_uri", "experiment",
              "model_name", "promotion_metric", "promotion_margin", "register_mode", "only_if_new_data",
              "credentials_secret"}


def _compiled(tmp_path: Path, res: Resources | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", res).read_text())
    return spec, platform


def _tasks(dag: dict[str, Any], components: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every task of the pipeline, nested DAGs (condition, loop) included."""
    for name, task in dag["tasks"].items():
        yield name, task
        inner = components[task["componentRef"]["name"]].get("dag")
        if inner:
            yield from _tasks(inner, components)


def test_compiled_spec(tmp_path: Path) -> None:
    spec, platform = _compiled(tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    for stage in STAGES:
        assert f"exec-{stage.replace('_', '-')}" in executors, stage
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == PARAMETERS
    for name, ex in executors.items():
        c = ex["container"]
        assert c["image"] == (BASE_IMAGE if name in GPU_EXECUTORS else CPU_IMAGE), name
        assert "pip install" not in " ".join(c["command"]), name  # install_kfp_package=False: the image has it
        r = c["resources"]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(r)
        if name in GPU_EXECUTORS:
            assert r["accelerator"]["resourceType"] == "nvidia.com/gpu" and r["accelerator"]["resourceCount"] == "1"
            assert c["env"] == [{"name": "OMP_NUM_THREADS", "value": "8"}]  # not the node's cores
            assert float(r["resourceCpuLimit"]) == 16  # 8 loader workers + the main process
        else:
            assert "accelerator" not in r, name
        secret = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][name]["secretAsEnv"][0]
        assert {e["envVar"] for e in secret["keyToEnv"]} == set(SECRET_KEYS)
        assert "credentials_secret" in json.dumps(secret["secretNameParameter"])

    tasks = dict(_tasks(spec["root"]["dag"], spec["components"]))
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"ingest", "fuse", "folds"}
    retried = {n for n, t in tasks.items() if t.get("retryPolicy", {}).get("maxRetryCount") == 2}
    assert retried == {"train-teacher", "distill"}
    loop = next(t for t in tasks.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("folds-Output")
    conditions = [t["triggerPolicy"]["condition"] for t in tasks.values() if "triggerPolicy" in t]
    assert any("retrain" in c for c in conditions)
    models = spec["components"]["comp-evaluate"]["inputDefinitions"]["artifacts"]["models"]
    assert models["isArtifactList"] is True  # dsl.Collected over the folds
    assert set(spec["root"]["outputDefinitions"]["parameters"]) == {"Output"}  # OneOf(register, no_new_data)

    cpu_only, _ = _compiled(tmp_path, Resources(gpus=0))
    assert all("accelerator" not in ex["container"]["resources"]
               for ex in cpu_only["deploymentSpec"]["executors"].values())


def test_committed_yaml_is_current(tmp_path: Path) -> None:
    """`blendsign pipeline compile` output is committed; recompile (default images) and compare."""
    assert DEFAULT_YAML.is_file(), "run `blendsign pipeline compile` and commit pipelines/blendsign_pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if k not in ("BLENDSIGN_IMAGE", "BLENDSIGN_CPU_IMAGE")}
    fresh = tmp_path / "fresh.yaml"
    subprocess.run([sys.executable, "-m", "blendsign.cli", "pipeline", "compile", "--output", str(fresh)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert fresh.read_text() == DEFAULT_YAML.read_text(), \
        "pipelines/blendsign_pipeline.yaml is stale: run `blendsign pipeline compile` and commit it"


# stage → (library module, function, the CLI code that calls the same function: `blendsign run` or the stage's command)
LIBRARY = {
    "ingest": ("blendsign.pipeline", "ingest_stage", lib_pipeline.run_pipeline),
    "fuse": ("blendsign.pipeline", "fuse_stage", lib_pipeline.run_pipeline),
    "folds": ("blendsign.pipeline", "folds_stage", lib_pipeline.run_pipeline),
    "train_teacher": ("blendsign.distill", "distill", cli),
    "distill": ("blendsign.distill", "distill", cli),
    "evaluate": ("blendsign.evaluate", "evaluate", cli),
    "register": ("blendsign.pipeline", "register_stage", lib_pipeline.run_pipeline),
}


@pytest.mark.parametrize("stage", sorted(LIBRARY))
def test_components_are_thin_wrappers_over_the_cli_functions(stage: str) -> None:
    module, func, cli_code = LIBRARY[stage]
    source = inspect.getsource(STAGES[stage].python_func)
    tree = ast.parse(source)
    body = tree.body[0]
    assert isinstance(body, ast.FunctionDef)
    imported = {(n.module, a.name) for n in ast.walk(body) if isinstance(n, ast.ImportFrom) for a in n.names}
    called = {n.func.id for n in ast.walk(body) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert (module, func) in imported and func in called, f"{stage} must call {module}.{func}"
    assert not any(m and m.split(".")[0] in ("torch", "numpy", "pandas", "sklearn") for m, _ in imported)
    statements = [n for n in body.body if not isinstance(n, ast.Import | ast.ImportFrom | ast.Expr)]
    assert len(statements) <= 6, f"{stage}: {len(statements)} statements is more than a thin wrapper"
    cli_source = inspect.getsource(cli_code)
    assert f"{func}(" in cli_source
    assert module == "blendsign.pipeline" or f"from {module} import {func}" in cli_source


def test_helper_components_call_the_library() -> None:
    for component, needle in ((stages.snapshot, "source_digest("), (stages.start_run, "open_pipeline_run("),
                              (stages.check_new_data, "decide("), (stages.no_new_data, "end_skipped_run(")):
        assert needle in inspect.getsource(component.python_func)


# --- submit / schedule against a recording KFP API server ------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[str, str, Any]]] = []
    replies: ClassVar[dict[str, dict[str, str]]] = {
        "experiments": {"experiment_id": "exp-1", "display_name": "blendsign"},
        "recurringruns": {"recurring_run_id": "rr-1", "display_name": "blendsign-retraining"},
        "runs": {"run_id": "run-1", "display_name": "r"},
    }

    def _reply(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        self.calls.append((self.command, self.path, body))
        resource = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        out = {} if self.command == "GET" else self.replies.get(resource, {})
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply()

    def do_POST(self) -> None:
        self._reply()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kfp_api() -> Iterator[tuple[str, list[tuple[str, str, Any]]]]:
    """A Kubeflow Pipelines API stand-in on 127.0.0.1 that records requests; stops after the test (or 120 s)."""
    _Recorder.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    deadline = threading.Timer(120, server.shutdown)
    deadline.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", _Recorder.calls
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _posted(calls: list[tuple[str, str, Any]], resource: str) -> dict[str, Any]:
    bodies = [b for m, p, b in calls if m == "POST" and p.split("?")[0].endswith(f"/apis/v2beta1/{resource}")]
    assert len(bodies) == 1, calls
    return bodies[0]


def _assert_spec(body: dict[str, Any], tmp_path: Path) -> None:
    spec, platform = _compiled(tmp_path)
    assert body["pipeline_spec"]["pipeline_spec"] == spec
    assert body["pipeline_spec"]["platform_spec"] == platform


def test_submit_sends_the_compiled_pipeline_and_parameters(kfp_api: tuple[str, list], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    host, calls = kfp_api
    argv = ["pipeline", "submit", "--host", host, "--source", "s3://scans/dicom/", "--annotations",
            "s3://scans/annotations.csv", "--config", "paper", "--k", "5", "--rounds", "2",
            "--tracking-uri", "http://mlflow:5000", "--run-name", "nightly", "--secret", "bs-creds"]
    assert cli.main(argv) == 0
    assert "submitted run run-1" in capsys.readouterr().out
    body = _posted(calls, "runs")
    assert body["display_name"] == "nightly" and body["experiment_id"] == "exp-1"
    assert body["runtime_config"]["parameters"] == {
        "source_uri": "s3://scans/dicom/", "annotations_uri": "s3://scans/annotations.csv", "clinical_uri": "",
        "preset": "paper", "k": 5, "rounds": 2, "tracking_uri": "http://mlflow:5000", "experiment": "blendsign",
        "model_name": "blendsign", "promotion_metric": "cv_auc_blend_sign", "promotion_margin": 0.0,
        "register_mode": "refit", "credentials_secret": "bs-creds", "only_if_new_data": False}
    _assert_spec(body, tmp_path)


def test_schedule_creates_a_recurring_retraining_run(kfp_api: tuple[str, list], tmp_path: Path) -> None:
    host, calls = kfp_api
    job = launch.schedule(host, "0 3 * * 1", {"source_uri": "s3://scans/dicom/",
                                              "annotations_uri": "s3://scans/annotations.csv"})
    assert job == "rr-1"
    body = _posted(calls, "recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"  # KFP's six fields, seconds first
    assert body["max_concurrency"] == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["experiment_id"] == "exp-1" and body["display_name"] == "blendsign-retraining"
    assert body["runtime_config"]["parameters"] == {"only_if_new_data": True, "source_uri": "s3://scans/dicom/",
                                                    "annotations_uri": "s3://scans/annotations.csv"}
    _assert_spec(body, tmp_path)
    with pytest.raises(ValueError, match="5 fields"):
        launch.kfp_cron("0 3 * *")
    with pytest.raises(ValueError, match="unknown pipeline parameter"):
        launch.schedule(host, "0 3 * * *", {"sourceuri": "x"})
    sent = len(calls)
    with pytest.raises(ValueError, match="promotion metric 'cv_auc_blendsign' unknown"):  # not after hours
        launch.submit(host, {"promotion_metric": "cv_auc_blendsign"})
    assert len(calls) == sent  # refused before anything was sent


# --- the whole pipeline on this machine (kfp.local) ------------------------------------------------------


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Everything the run prints or logs, its tasks' subprocesses included, into ``path``."""
    root = logging.getLogger()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with path.open("w") as f, redirect_stdout(f), redirect_stderr(f):
        handler, level = logging.StreamHandler(f), root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            f.flush()
            for fd, old in zip((1, 2), saved, strict=True):
                os.dup2(old, fd)
                os.close(old)
            root.removeHandler(handler)
            root.setLevel(level)


@pytest.fixture(scope="module")
def local_run(cohort: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One local pipeline run (ci preset, 2 folds, 1 distillation round) on the session's tiny cohort.

    Everything it prints (the tasks' logs) goes to ``run.log`` in the work folder.
    """
    work = tmp_path_factory.mktemp("kfp-local")
    old_cwd = Path.cwd()
    os.chdir(work)  # .blendsign/last_run.json goes here, not into the checkout
    try:
        src = cohort["root"] / "src"
        kwargs = {"preset": "ci", "work_dir": work / "work", "source": str(src / "dicom"),
                  "annotations": str(src / "annotations.csv"), "clinical": str(src / "clinical.csv"), "k": 2,
                  "rounds": 1, "tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "kfp-local",
                  "model_name": "blendsign-kfp", "progress": False}
        with _output_to(work / "run.log"):
            first = launch.run_local(**kwargs)
        last_run = json.loads((work / ".blendsign" / "last_run.json").read_text())
        return {"work": work, "kwargs": kwargs, "first": first, "last_run": last_run}
    finally:
        os.chdir(old_cwd)


@pytest.mark.slow
def test_local_run_registers_a_champion_with_the_mlflow_tree(local_run: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    record = local_run["first"].record
    assert local_run["last_run"] == record
    assert record["status"] == "registered" and record["promoted"] is True
    assert record["model_uri"] == "models:/blendsign-kfp@champion"
    assert {"tracking_uri", "experiment", "parent_run_id", "registered_model", "model_version"} <= set(record)
    assert "2-fold cross-validation" in local_run["first"].summary and "champion: blendsign-kfp v1" in \
        local_run["first"].summary

    client = MlflowClient(tracking_uri=record["tracking_uri"])
    champion = client.get_model_version_by_alias("blendsign-kfp", "champion")
    assert str(champion.version) == str(record["model_version"])
    runs = client.search_runs([client.get_experiment_by_name("kfp-local").experiment_id], max_results=500)
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[record["parent_run_id"]]
    fingerprint = parent.data.tags["data_fingerprint"]
    assert champion.tags["data_fingerprint"] == fingerprint and parent.data.tags["status"] == "registered"
    assert "cv_auc_blend_sign" in parent.data.metrics and parent.info.status == "FINISHED"

    def children(run_id: str) -> dict[str, Any]:
        return {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id}

    top = children(parent.info.run_id)
    assert set(top) == {"cross-validation", "refit", "register"}
    assert [r.info.run_name for r in runs].count("refit") == 1  # trained once, in the loop, not again by register
    folds = children(top["cross-validation"].info.run_id)
    assert set(folds) == {"fold0", "fold1"}
    assert set(children(folds["fold0"].info.run_id)) == {"fold0-round0", "fold0-round1"}
    assert "cv_auc_blend_sign" in top["cross-validation"].data.metrics
    stage_runs = {r.info.run_name for r in runs if r.data.tags.get("data_fingerprint") == fingerprint
                  and "mlflow.parentRunId" not in r.data.tags}
    assert {"ingest", "fuse", "folds", "pipeline"} <= stage_runs  # cached stages: linked by the fingerprint
    assert all(r.info.status == "FINISHED" for r in runs)


IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "InstitutionAddress",
                    "ReferringPhysicianName", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                    "SOPInstanceUID", "FrameOfReferenceUID")


def _readable(path: Path) -> str:
    """A file's content as text: Parquet decoded (pixels left out), a torch checkpoint's pickled objects (its
    tensor storages left out), anything else byte for byte."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        table = table.drop([f.name for f in table.schema if f.type in ("binary", "large_binary")])
        return str(table.to_pylist()) + str(table.schema.metadata)
    if path.suffix == ".pt":
        with zipfile.ZipFile(path) as z:
            return "".join(z.read(n).decode("latin-1") for n in z.namelist() if "/data/" not in n)
    return path.read_bytes().decode("latin-1")


@pytest.mark.slow
def test_no_identifier_reaches_outputs_mlflow_or_logs(local_run: dict[str, Any], cohort: dict[str, Path]) -> None:
    """Every file of the run (stage outputs, kfp's artifacts, the MLflow database and artifact store, models,
    the tasks' logs) is free of the source's names, IDs, birth dates, institutions, accession numbers, UIDs."""
    secrets: set[str] = set()
    for f in filter(Path.is_file, (cohort["root"] / "src" / "dicom").rglob("*")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for tag in IDENTIFYING_TAGS:
            value = str(ds.get(tag, "") or "")
            secrets |= {value, *value.split("^")} if tag.endswith("Name") else {value}
    long = {s for s in secrets if len(s) >= 6}  # shorter name parts match by chance in binary files ...
    words = re.compile("|".join(rf"\b{re.escape(s)}\b" for s in secrets - long if s))  # ... but not as text
    assert len(long) > 100 and words.pattern
    files = [f for f in local_run["work"].rglob("*") if f.is_file()]
    kinds = {f.suffix for f in files}
    assert {".parquet", ".db", ".log", ".json", ".png", ".pt"} <= kinds, kinds  # the stores were all looked at
    assert (local_run["work"] / "run.log").stat().st_size > 0
    leaks = {}
    for f in files:
        text = _readable(f)
        found = [s for s in long if s in text]
        if f.suffix in {".json", ".log", ".md", ".csv", ".txt", ".yaml", ".parquet"}:
            found += words.findall(text)
        if found:
            leaks[f.relative_to(local_run["work"]).as_posix()] = sorted(set(found))
    assert not leaks


@pytest.mark.slow
def test_local_rerun_without_new_data_ends_early(local_run: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    old_cwd = Path.cwd()
    os.chdir(local_run["work"])
    try:
        second = launch.run_local(**{**local_run["kwargs"], "only_if_new_data": True})
    finally:
        os.chdir(old_cwd)
    record = second.record
    assert record["status"] == "skipped" and "no new data" in record["decision"]
    assert str(record["model_version"]) == str(local_run["first"].record["model_version"])
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    parent = client.get_run(record["parent_run_id"])
    assert parent.data.tags["status"] == "skipped: no new data" and parent.info.status == "FINISHED"
    assert len(client.search_model_versions("name='blendsign-kfp'")) == 1  # nothing trained or registered
