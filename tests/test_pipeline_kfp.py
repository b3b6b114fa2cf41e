"""The Kubeflow pipeline: the compiled spec of each variant (resources, /dev/shm, profile keys, backend features,
exit handler, UI outputs, labels), the committed YAMLs, thin components, submit/schedule against a recording
Kubeflow API stand-in that reports a backend version, and (slow) the whole pipeline here with kfp.local."""

from __future__ import annotations

import ast
import functools
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

from blendsign import pipeline as lib_pipeline
from blendsign.components import images, stages
from blendsign.components.stages import STAGES
from blendsign.config import Config, load_preset
from blendsign.credentials import DIR_ENV
from blendsign.data import shared_memory_bytes
from blendsign.pipelines import launch
from blendsign.pipelines.backends import VARIANTS, features_used, minimum_backend
from blendsign.pipelines.blendsign_pipeline import (
    COMMITTED,
    CREDENTIALS_DIR,
    RUN_SETTINGS,
    build_pipeline,
    compile_pipeline,
)
from blendsign.pipelines.profile import ClusterProfile, load_profile
from tests.conftest import EXPECTED_TREE, LOCAL_PRESET, run_tree

ROOT = Path(__file__).resolve().parents[1]
GPU_EXECUTORS = {"exec-train-teacher", "exec-distill", "exec-evaluate"}
LOADER_EXECUTORS = {"exec-train-teacher", "exec-distill", "exec-evaluate", "exec-evaluate-from-work"}
PARAMETERS = {"source_uri", "annotations_uri", "work_uri", "clinical_uri", "preset", "k", "rounds", "tracking_uri",
              "experiment", "model_name", "promotion_metric", "promotion_margin", "register_mode",
              "only_if_new_data", "credentials_secret"}


@functools.cache
def _default_yaml(variant: str, tmp: str) -> str:
    return compile_pipeline(Path(tmp) / f"default-{variant}.yaml", None, variant).read_text()


def _parse(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return spec, platform


@functools.cache
def _default(variant: str, tmp: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return _parse(_default_yaml(variant, tmp))


def _compiled(tmp_path: Path, profile: ClusterProfile | None = None, variant: str = "current",
              preset: str = "paper") -> tuple[dict[str, Any], dict[str, Any]]:
    """The compiled spec and platform spec (the default profile's compiled and parsed once per variant: read
    them, do not change them)."""
    if profile is None and preset == "paper":
        return _default(variant, str(tmp_path.parent))
    return _parse(compile_pipeline(tmp_path / f"{variant}.yaml", profile, variant, preset).read_text())


def _tasks(dag: dict[str, Any], components: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every task of the pipeline, nested DAGs (exit handler, conditions, loop) included."""
    for name, task in dag["tasks"].items():
        yield name, task
        inner = components[task["componentRef"]["name"]].get("dag")
        if inner:
            yield from _tasks(inner, components)


def _k8s(platform: dict[str, Any]) -> dict[str, Any]:
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_spec_resources_shm_secrets_and_retries(tmp_path: Path, variant: str) -> None:
    spec, platform = _compiled(tmp_path, variant=variant)
    executors, k8s = spec["deploymentSpec"]["executors"], _k8s(platform)
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == PARAMETERS
    shm = f"{-(-shared_memory_bytes(load_preset('paper').data, 16) // 2**20)}Mi"  # 8 workers at 512 px
    for name, ex in executors.items():
        c, config = ex["container"], k8s[name]
        gpu = name in GPU_EXECUTORS or name == "exec-evaluate-from-work"
        assert c["image"] == (images.BASE_IMAGE if gpu else images.CPU_IMAGE), name
        assert "pip install" not in " ".join(c["command"]), name  # install_kfp_package=False: the image has it
        r = c["resources"]
        assert "resourceCpuLimit" not in r and r["resourceMemoryLimit"] == r["resourceMemoryRequest"], name
        if gpu:
            assert r["accelerator"]["resourceType"] == "nvidia.com/gpu" and r["accelerator"]["resourceCount"] == "1"
            assert float(r["resourceCpuRequest"]) <= 7 and r["resourceMemoryLimit"] == "24Gi"  # an 8-vCPU node
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in config["tolerations"]
        else:
            assert "accelerator" not in r, name
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["OMP_NUM_THREADS"] == str(int(float(r["resourceCpuRequest"]))) or env["OMP_NUM_THREADS"] == "1"
        assert env[DIR_ENV] == CREDENTIALS_DIR and env["BLENDSIGN_IMAGE_REF"] == c["image"]
        assert config["secretAsVolume"] == [{"mountPath": CREDENTIALS_DIR, "optional": True, "secretNameParameter": {
            "componentInputParameter": config["secretAsVolume"][0]["secretNameParameter"]["componentInputParameter"]}}]
        assert "credentials_secret" in json.dumps(config["secretAsVolume"]) and "secretAsEnv" not in config
        assert int(config["activeDeadlineSeconds"]) > 0, name  # no pod Pending or hanging for ever
        mounts = {m["mountPath"]: m for m in config.get("emptyDirMounts", [])}
        if name in LOADER_EXECUTORS:
            assert mounts["/dev/shm"] == {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                          "sizeLimit": shm}
        else:
            assert "/dev/shm" not in mounts, name
    tasks = dict(_tasks(spec["root"]["dag"], spec["components"]))
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"ingest", "fuse", "folds"}
    retries = {n: t["retryPolicy"] for n, t in tasks.items() if "retryPolicy" in t}
    assert retries["train-teacher"]["maxRetryCount"] == 3 and retries["distill"]["maxRetryCount"] == 3
    assert retries["distill"]["backoffMaxDuration"] == ClusterProfile().train.retry_window  # covers 4 × 24 h
    assert int(retries["distill"]["backoffMaxDuration"][:-1]) > 4 * 24 * 3600
    register = next(n for n in tasks if n.startswith("register"))
    assert register not in retries  # a retried registration would add a second version
    assert "exec-register" not in GPU_EXECUTORS  # registers on CPU: the refit trained in the loop


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_secret_name_resolves_in_every_dag(tmp_path: Path, variant: str) -> None:
    """The driver resolves ``secretNameParameter`` among the inputs of the task's parent DAG (driver/k8s.go):
    every DAG holding a task that mounts the secret must receive the parameter."""
    spec, platform = _compiled(tmp_path, variant=variant)
    executors = _k8s(platform)
    dags = {"root": spec["root"], **{n: c for n, c in spec["components"].items() if "dag" in c}}
    checked = 0
    for dag in dags.values():
        inputs = set(dag.get("inputDefinitions", {}).get("parameters", {}))
        for task in dag["dag"]["tasks"].values():
            executor = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            for mount in executors.get(executor, {}).get("secretAsVolume", []):
                assert mount["secretNameParameter"]["componentInputParameter"] in inputs, task["taskInfo"]
                checked += 1
    assert checked == len(executors)  # every task mounts it


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_input_has_the_type_its_component_declares(tmp_path: Path, variant: str) -> None:
    """The driver refuses a parameter whose type differs from the component's (2.5.0 driver.go:1477, 2.17.0
    resolve.go:232: "type mismatch"); kfp.local does not check. A loop item is typed by the list it iterates:
    ``folds`` returns ``list[int]``, so each training job's ``job`` is an integer, as declared."""
    spec, _ = _compiled(tmp_path, variant=variant)
    dags = {"root": spec["root"], **{n: c for n, c in spec["components"].items() if "dag" in c}}
    seen = 0
    for dag in dags.values():
        available = dag.get("inputDefinitions", {}).get("parameters", {})
        for task in dag["dag"]["tasks"].values():
            wanted = spec["components"][task["componentRef"]["name"]].get("inputDefinitions", {}).get("parameters", {})
            for name, source in task.get("inputs", {}).get("parameters", {}).items():
                if "componentInputParameter" in source:
                    assert available[source["componentInputParameter"]]["parameterType"] == \
                        wanted[name]["parameterType"], (task["taskInfo"], name)
                    seen += 1
    assert seen > 80  # every step's parameters (92 in the current variant)
    loop = next(c for n, c in spec["components"].items() if n.startswith("comp-for-loop"))
    items = [p for n, p in loop["inputDefinitions"]["parameters"].items() if n.endswith("-loop-item")]
    assert [p["parameterType"] for p in items] == ["NUMBER_INTEGER"]


def test_gpu_tasks_require_cuda_unless_compiled_for_cpu(tmp_path: Path) -> None:
    def devices(spec: dict[str, Any]) -> set[str]:
        tasks = dict(_tasks(spec["root"]["dag"], spec["components"]))
        return {t["inputs"]["parameters"]["device"]["runtimeValue"]["constant"]
                for t in tasks.values() if "device" in t.get("inputs", {}).get("parameters", {})}

    assert devices(_compiled(tmp_path)[0]) == {"cuda"}  # a GPU pod without CUDA fails, never trains on the CPU
    cpu, _ = _compiled(tmp_path, ClusterProfile().with_gpus(0))
    assert devices(cpu) == {"cpu"}
    assert all("accelerator" not in ex["container"]["resources"] for ex in cpu["deploymentSpec"]["executors"].values())


def test_every_profile_key_reaches_the_pods(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("""image = "registry.example.org/ml/blendsign@sha256:0123"
cpu_image = "registry.example.org/ml/blendsign-cpu@sha256:4567"
parallelism = 2
[defaults]
image_pull_secrets = ["regcred"]
image_pull_policy = "Always"
[train]
cpu = "14"
cpu_limit = "15"
memory = "96Gi"
gpus = 2
gpu_resource = "nvidia.com/mig-3g.40gb"
node_selector = { "nvidia.com/gpu.product" = "NVIDIA-H200" }
tolerations = [{ key = "dedicated", operator = "Equal", value = "ml", effect = "NoExecute", seconds = 600 }]
timeout = "12h"
retries = 1
retry_backoff = "5m"
threads = 12
scratch = "300Gi"
scratch_storage_class = "fast-nvme"
""")
    spec, platform = _compiled(tmp_path, load_profile(site), preset="demo")
    ex, config = spec["deploymentSpec"]["executors"]["exec-distill"]["container"], _k8s(platform)["exec-distill"]
    assert ex["image"] == "registry.example.org/ml/blendsign@sha256:0123"
    r = ex["resources"]
    assert (r["resourceCpuRequest"], r["resourceCpuLimit"], r["resourceMemoryLimit"]) == ("14", "15", "96Gi")
    assert r["accelerator"]["resourceType"] == "nvidia.com/mig-3g.40gb" and r["accelerator"]["resourceCount"] == "2"
    assert config["nodeSelector"] == {"labels": {"nvidia.com/gpu.product": "NVIDIA-H200"}}
    assert config["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute",
                                      "tolerationSeconds": "600"}]
    assert config["activeDeadlineSeconds"] == str(12 * 3600)
    assert config["imagePullPolicy"] == "Always"
    assert config["imagePullSecret"] == [{"secretName": "regcred", "secretNameParameter": {
        "runtimeValue": {"constant": "regcred"}}}]
    assert config["genericEphemeralVolume"] == [{"volumeName": "scratch", "mountPath": "/scratch",
                                                 "accessModes": ["ReadWriteOnce"], "size": "300Gi",
                                                 "storageClassName": "fast-nvme"}]
    env = {e["name"]: e["value"] for e in ex["env"]}
    assert env["OMP_NUM_THREADS"] == "12" and env["TMPDIR"] == "/scratch"
    shm = next(m for m in config["emptyDirMounts"] if m["mountPath"] == "/dev/shm")
    demo = load_preset("demo")
    assert shm["sizeLimit"] == f"{-(-shared_memory_bytes(demo.data, demo.train.batch_size) // 2**20)}Mi"  # the preset's
    tasks = dict(_tasks(spec["root"]["dag"], spec["components"]))
    assert tasks["distill"]["retryPolicy"] == {"maxRetryCount": 1, "backoffDuration": "300s", "backoffFactor": 2.0,
                                               "backoffMaxDuration": f"{2 * 12 * 3600 + 300}s"}
    assert spec["root"]["inputDefinitions"]["parameters"]["preset"]["defaultValue"] == "demo"
    loop = next(t for t in tasks.values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"] == {"parallelismLimit": 2}  # two GPUs: two training jobs at a time
    light = spec["deploymentSpec"]["executors"]["exec-check-inputs"]["container"]
    assert light["image"] == "registry.example.org/ml/blendsign-cpu@sha256:4567"
    assert _k8s(platform)["exec-check-inputs"]["imagePullSecret"][0]["secretName"] == "regcred"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_feature_beyond_the_variants_minimum_backend(tmp_path: Path, variant: str) -> None:
    spec, platform = _compiled(tmp_path, variant=variant)
    assert minimum_backend(spec, platform) <= VARIANTS[variant].minimum
    used = {f.name for f in features_used(spec, platform)}
    if variant == "compat":  # what 2.5.0 rejects, fails or drops with a stopped pod
        assert used == set()
        text = json.dumps(spec)
        assert "isArtifactList" not in text and "TASK_FINAL_STATUS" not in text
    else:
        assert {"artifact fan-in (dsl.Collected)", "fan-in from a named loop",
                "exit status (PipelineTaskFinalStatus)"} <= used


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exit_handler_ends_the_mlflow_runs_whatever_happened(tmp_path: Path, variant: str) -> None:
    spec, _ = _compiled(tmp_path, variant=variant)
    root = spec["root"]["dag"]["tasks"]
    exit_task = next(t for n, t in root.items() if n.startswith("end-run"))
    handler = next(n for n in root if n.startswith("exit-handler"))
    assert exit_task["dependentTasks"] == [handler]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs after a failure too
    params = exit_task["inputs"]["parameters"]
    assert params["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert ("status" in params) is (variant == "current")
    inside = {n for n, _ in _tasks(spec["components"][root[handler]["componentRef"]["name"]]["dag"],
                                   spec["components"])}
    assert {"check-inputs", "ingest", "train-teacher", "distill", "no-new-data"} <= inside  # everything is guarded


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ui_outputs_labels_and_descriptions(tmp_path: Path, variant: str) -> None:
    spec, _ = _compiled(tmp_path, variant=variant)
    evaluate = "comp-evaluate" if variant == "current" else "comp-evaluate-from-work"
    outputs = spec["components"][evaluate]["outputDefinitions"]["artifacts"]
    kinds = {name: o["artifactType"]["schemaTitle"] for name, o in outputs.items()}
    assert kinds == {"cv": "system.Dataset", "metrics": "system.Metrics", "report": "system.Markdown",
                     "report_html": "system.HTML", "roc_non_ich": "system.ClassificationMetrics",
                     "roc_normal_ich": "system.ClassificationMetrics", "roc_blend_sign": "system.ClassificationMetrics",
                     "confusion": "system.ClassificationMetrics"}
    for job_step in ("comp-train-teacher", "comp-distill"):  # each loop iteration says which job it was
        assert spec["components"][job_step]["outputDefinitions"]["artifacts"]["summary"]["artifactType"][
            "schemaTitle"] == "system.Markdown"
    assert spec["components"]["comp-start-run"]["outputDefinitions"]["artifacts"]["mlflow"]  # the MLflow link
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert all(p.get("description") for p in params.values())
    assert "blend-sign" in spec["pipelineInfo"]["description"]
    assert not params["source_uri"].get("isOptional") and "defaultValue" not in params["source_uri"]  # required
    assert not params["annotations_uri"].get("isOptional") and "defaultValue" not in params["annotations_uri"]
    tasks = dict(_tasks(spec["root"]["dag"], spec["components"]))
    labels = {t["taskInfo"]["name"] for t in tasks.values()}
    if variant == "current":
        assert {"training jobs: folds, then the refit", "teacher", "students", "evaluate"} <= labels
    else:  # 2.5.0 cannot resolve the outputs of a renamed task
        assert all(t["taskInfo"]["name"] == n for n, t in tasks.items())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_committed_yaml_is_current(tmp_path: Path, variant: str) -> None:
    """`make pipelines` output is committed; recompile (default images and profile) and compare."""
    committed = COMMITTED[variant]
    assert committed.is_file(), "run `make pipelines` and commit pipelines/*.yaml"
    if (images.DEFAULT_IMAGE, f"{images.DEFAULT_IMAGE}-cpu") != (images.BASE_IMAGE, images.CPU_IMAGE):
        pytest.skip("BLENDSIGN_IMAGE or BLENDSIGN_CPU_IMAGE is set: the committed YAMLs name the default images")
    assert _default_yaml(variant, str(tmp_path.parent)) == committed.read_text(), \
        f"{committed.name} is stale: run `make pipelines` and commit it"


def test_the_run_settings_parameters_default_to_the_config(tmp_path: Path) -> None:
    """The parameters that carry config fields default to the config the pipeline is compiled for: ``Config()``
    for the presets (so the committed YAMLs stay as they are), a site TOML's own values otherwise."""
    def defaults(preset: str) -> dict[str, Any]:
        return {k: v.default for k, v in build_pipeline(preset=preset).component_spec.inputs.items()}

    cfg = Config()
    paper = {"experiment": cfg.tracking.experiment, "model_name": cfg.registry.model_name,
             "promotion_metric": cfg.registry.promotion_metric, "promotion_margin": cfg.registry.promotion_margin,
             "register_mode": cfg.registry.mode}
    assert paper == {"experiment": "blendsign", "model_name": "blendsign", "promotion_metric": "cv_auc_blend_sign",
                     "promotion_margin": 0.0, "register_mode": "refit"}
    assert set(RUN_SETTINGS) == set(paper) <= set(launch.PARAMETERS)
    assert {p: defaults("paper")[p] for p in paper} == paper == {p: defaults("demo")[p] for p in paper}
    site = tmp_path / "site.toml"
    site.write_text('preset = "demo"\n[registry]\nmodel_name = "site-model"\npromotion_margin = 0.01\n'
                    'mode = "fold-ensemble"\n[tracking]\nexperiment = "site"\n')
    assert {p: defaults(str(site))[p] for p in paper} == {
        **paper, "model_name": "site-model", "promotion_margin": 0.01, "register_mode": "fold-ensemble",
        "experiment": "site"}


def test_compile_writes_where_it_is_told_never_into_the_checkout(tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in COMMITTED.values()}
    subprocess.run([sys.executable, "-m", "blendsign.cli", "pipeline", "compile", "--config", "demo"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=300)
    spec = next(yaml.safe_load_all((tmp_path / "blendsign_pipeline.yaml").read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["preset"]["defaultValue"] == "demo"  # --config counts
    assert {p: p.stat().st_mtime_ns for p in COMMITTED.values()} == before


# component → the blendsign.pipeline step it calls; run_pipeline (`blendsign run`) calls the same steps
STEPS = {
    "check_inputs": "check_run", "snapshot": "snapshot", "ingest": "ingest_step", "fuse": "fuse_step",
    "folds": "folds_step", "start_run": "start_run", "check_new_data": "check_new_data", "train_teacher": "train_job",
    "distill": "train_job", "evaluate": "evaluate_step", "evaluate_from_work": "evaluate_step",
    "register": "register_step", "no_new_data": "no_new_data",
    "end_run": "end_run", "end_run_without_status": "end_run",
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_components_are_thin_wrappers_over_the_steps_blendsign_run_calls(name: str) -> None:
    func = STEPS[name]
    component = getattr(stages, name)
    body = ast.parse(inspect.getsource(component.python_func)).body[0]
    assert isinstance(body, ast.FunctionDef)
    imported = {(n.module, a.name) for n in ast.walk(body) if isinstance(n, ast.ImportFrom) for a in n.names}
    called = {n.func.id for n in ast.walk(body) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert ("blendsign.pipeline", func) in imported and func in called, f"{name} must call blendsign.pipeline.{func}"
    assert not any(m and m.split(".")[0] in ("torch", "numpy", "pandas", "sklearn") for m, _ in imported)
    statements = [n for n in body.body if not isinstance(n, ast.Import | ast.ImportFrom | ast.Expr)]
    assert len(statements) <= 4, f"{name}: {len(statements)} statements is more than a thin wrapper"
    assert getattr(lib_pipeline, func).__wrapped__  # a @step: credentials loaded first
    if func != "snapshot":  # (Kubeflow's cache key: nothing to cache in one process)
        assert f"{func}(" in inspect.getsource(lib_pipeline.run_pipeline), f"blendsign run must call {func} too"


def test_stages_are_the_seven_of_the_method() -> None:
    assert list(STAGES) == ["ingest", "fuse", "folds", "train_teacher", "distill", "evaluate", "register"]


# --- submit / schedule against a recording KFP API server ------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[str, str, Any]]] = []
    version: ClassVar[str] = "2.17.0"
    replies: ClassVar[dict[str, dict[str, str]]] = {
        "experiments": {"experiment_id": "exp-1", "display_name": "blendsign"},
        "recurringruns": {"recurring_run_id": "rr-1", "display_name": "blendsign-retraining"},
        "runs": {"run_id": "run-1", "display_name": "r"},
    }

    recurring: ClassVar[dict[str, dict[str, Any]]] = {}  # the recurring runs the server holds, by id

    def _recurring(self, body: Any) -> dict[str, Any]:
        """List, create, disable, enable and delete recurring runs as the v2beta1 API does (by id)."""
        path = self.path.split("?")[0].rstrip("/")
        tail = path.split("/apis/v2beta1/recurringruns", 1)[1].lstrip("/")
        if self.command == "GET" and not tail:
            return {"recurringRuns": list(self.recurring.values())}  # the JSON name kfp_server_api reads
        if self.command == "POST" and not tail:
            run_id = f"rr-{len(self.calls)}"
            self.recurring[run_id] = {"recurring_run_id": run_id, "display_name": body["display_name"],
                                      "status": "ENABLED"}
            return self.recurring[run_id]
        run_id, _, action = tail.partition(":")
        if self.command == "DELETE":
            self.recurring.pop(run_id)
        else:
            self.recurring[run_id]["status"] = {"disable": "DISABLED", "enable": "ENABLED"}[action]
        return {}

    def _reply(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        self.calls.append((self.command, self.path, body))
        resource = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        if resource == "healthz":  # what a real API server answers (apiserver/main.go)
            out: dict[str, Any] = {"commit_sha": "abc", "tag_name": self.version, "multi_user": False}
        elif "/recurringruns" in self.path:
            out = self._recurring(body)
        else:
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

    def do_DELETE(self) -> None:
        self._reply()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kfp_api() -> Iterator[tuple[str, list[tuple[str, str, Any]]]]:
    """A Kubeflow Pipelines API stand-in on 127.0.0.1 that records requests; stops after the test (or 120 s)."""
    _Recorder.calls, _Recorder.version, _Recorder.recurring = [], "2.17.0", {}
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


def _assert_spec(body: dict[str, Any], tmp_path: Path, variant: str) -> None:
    spec, platform = _compiled(tmp_path, variant=variant)
    assert body["pipeline_spec"]["pipeline_spec"] == spec
    assert body["pipeline_spec"]["platform_spec"] == platform


SUBMIT = ["--source", "s3://scans/dicom/", "--annotations", "s3://scans/annotations.csv", "--work",
          "s3://scans/blendsign-work/", "--config", "paper"]


@pytest.mark.parametrize(("version", "variant"), [("2.17.0", "current"), ("2.16.1", "current"),
                                                  ("2.14.4", "compat"), ("2.5.0", "compat")])
def test_submit_asks_the_server_its_version_and_sends_the_variant_it_runs(
        kfp_api: tuple[str, list], tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str,
        variant: str) -> None:
    host, calls = kfp_api
    _Recorder.version = version
    argv = ["pipeline", "submit", "--host", host, *SUBMIT, "--k", "5", "--rounds", "2",
            "--tracking-uri", "http://mlflow:5000", "--run-name", "nightly", "--secret", "bs-creds"]
    assert cli_main(argv) == 0
    assert "submitted run run-1" in capsys.readouterr().out
    assert calls[0][:2] == ("GET", "/apis/v2beta1/healthz")  # asked first
    body = _posted(calls, "runs")
    assert body["display_name"] == "nightly" and body["experiment_id"] == "exp-1"
    assert body["runtime_config"]["parameters"] == {
        "source_uri": "s3://scans/dicom/", "annotations_uri": "s3://scans/annotations.csv",
        "work_uri": "s3://scans/blendsign-work/", "clinical_uri": "", "preset": "paper", "k": 5, "rounds": 2,
        "tracking_uri": "http://mlflow:5000", "experiment": "blendsign", "model_name": "blendsign",
        "promotion_metric": "cv_auc_blend_sign", "promotion_margin": 0.0, "register_mode": "refit",
        "credentials_secret": "bs-creds", "only_if_new_data": False}
    _assert_spec(body, tmp_path, variant)


def test_an_unsupported_backend_is_refused_before_anything_is_uploaded(kfp_api: tuple[str, list],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    host, calls = kfp_api
    _Recorder.version = "2.4.1"
    assert cli_main(["pipeline", "submit", "--host", host, *SUBMIT]) == 2
    assert "backend is version 2.4.1" in caplog.text and "needs 2.5.0 or newer" in caplog.text
    _Recorder.version = "2.14.0"
    assert cli_main(["pipeline", "schedule", "--host", host, "--cron", "0 3 * * 1", "--backend", "current",
                     *SUBMIT]) == 2
    assert "backend is version 2.14.0; the 'current' pipeline needs 2.16.0 or newer" in caplog.text
    assert "--backend compat" in caplog.text
    assert [m for m, _, _ in calls] == ["GET", "GET"]  # the two health requests, nothing posted


def test_schedule_creates_a_recurring_retraining_run(kfp_api: tuple[str, list], tmp_path: Path) -> None:
    host, calls = kfp_api
    job = launch.schedule(host, "0 3 * * 1", {"source_uri": "s3://scans/dicom/",
                                              "annotations_uri": "s3://scans/annotations.csv",
                                              "work_uri": "s3://scans/work/"})
    assert list(_Recorder.recurring) == [job]
    body = _posted(calls, "recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"  # KFP's six fields, seconds first
    assert body["max_concurrency"] == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["experiment_id"] == "exp-1" and body["display_name"] == "blendsign-retraining"
    assert body["runtime_config"]["parameters"] == {"only_if_new_data": True, "source_uri": "s3://scans/dicom/",
                                                    "annotations_uri": "s3://scans/annotations.csv",
                                                    "work_uri": "s3://scans/work/"}
    _assert_spec(body, tmp_path, "current")
    with pytest.raises(ValueError, match="5 fields"):
        launch.kfp_cron("0 3 * *")
    sent = len(calls)
    with pytest.raises(ValueError, match="unknown pipeline parameter"):
        launch.schedule(host, "0 3 * * *", {"sourceuri": "x"})
    with pytest.raises(ValueError, match="promotion metric 'cv_auc_blendsign' unknown"):  # not after hours
        launch.submit(host, {"promotion_metric": "cv_auc_blendsign"})
    with pytest.raises(ValueError, match="register mode must be one of"):
        launch.submit(host, {"register_mode": "ensemble"})
    assert len(calls) == sent  # refused before anything was sent, the server not even asked


def test_scheduling_again_replaces_the_recurring_run_of_that_name(kfp_api: tuple[str, list]) -> None:
    host, calls = kfp_api
    args = {"source_uri": "s3://scans/dicom/", "annotations_uri": "s3://scans/annotations.csv",
            "work_uri": "s3://scans/work/"}
    first = launch.schedule(host, "0 3 * * 1", args)
    other = launch.schedule(host, "0 4 * * *", args, name="another-schedule")
    start = len(calls)
    second = launch.schedule(host, "0 5 * * 1", args)
    assert sorted(_Recorder.recurring) == sorted([second, other]) and second != first
    order = [(m, p.split("?")[0].rsplit("/", 1)[-1]) for m, p, _ in calls[start:] if "recurringruns" in p]
    assert order == [("GET", "recurringruns"), ("POST", f"{first}:disable"), ("POST", "recurringruns"),
                     ("DELETE", first)]  # the old one stops before the new one exists, and goes after
    assert all(r["status"] == "ENABLED" for r in _Recorder.recurring.values())


def cli_main(argv: list[str]) -> int:
    from blendsign import cli

    return cli.main(argv)


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
        kwargs = {"preset": str(LOCAL_PRESET), "work_dir": work / "work", "source": str(src / "dicom"),
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
    assert {"tracking_uri", "experiment", "parent_run_id", "registered_model", "model_version",
            "pipeline_run_id"} <= set(record)
    assert "2-fold cross-validation" in local_run["first"].summary and "champion: blendsign-kfp v1" in \
        local_run["first"].summary

    client = MlflowClient(tracking_uri=record["tracking_uri"])
    champion = client.get_model_version_by_alias("blendsign-kfp", "champion")
    assert str(champion.version) == str(record["model_version"])
    parent = client.get_run(record["parent_run_id"])
    fingerprint = parent.data.tags["data_fingerprint"]
    assert champion.tags["data_fingerprint"] == fingerprint and parent.data.tags["status"] == "registered"
    assert "cv_auc_blend_sign" in parent.data.metrics and parent.info.status == "FINISHED"
    assert parent.data.tags["kfp_run_id"] == parent.data.tags["pipeline_run_id"] == record["pipeline_run_id"]
    tree = run_tree(record["tracking_uri"], "kfp-local", parent.info.run_id)
    assert tree == {"tree": EXPECTED_TREE, "statuses": {"FINISHED"}}  # the exit handler found nothing RUNNING
    runs = client.search_runs([parent.info.experiment_id], max_results=500)
    assert all(r.data.tags.get("pipeline_run_id") == record["pipeline_run_id"] for r in runs
               if r.data.tags.get("stage") not in ("ingest", "fuse", "folds"))  # what the exit handler searches
    stage_runs = {r.info.run_name for r in runs if r.data.tags.get("data_fingerprint") == fingerprint
                  and "mlflow.parentRunId" not in r.data.tags}
    assert {"ingest", "fuse", "folds", "pipeline"} <= stage_runs  # cached stages: linked by the fingerprint


@pytest.mark.slow
def test_local_run_steps_hand_on_only_what_the_next_reads(local_run: dict[str, Any]) -> None:
    kfp_root = local_run["work"] / "work" / "kfp"
    run_dir = next(p for p in kfp_root.iterdir() if p.name.startswith("blendsign-"))
    loop_files = [p.relative_to(run_dir).as_posix() for p in run_dir.glob("for-loop-*/**/*") if p.is_file()]
    models = sorted(f for f in loop_files if f.endswith(".pt"))
    assert models and all(f.endswith("model.pt") and "/model/" in f for f in models), models  # no last.pt, teacher
    assert len(models) == 3  # one final model per training job (2 folds + the refit)
    manifest = next(run_dir.glob("ingest/manifest"))
    assert sorted(p.name for p in manifest.iterdir()) == ["ingest_report.json", "manifest.json"]  # no slices
    html = next(run_dir.glob("evaluate/report_html"))
    text = html.read_text()
    assert text.count("data:image/png;base64,") >= 4 and "src=\"roc.png\"" not in text  # self-contained
    roc = json.loads(next(run_dir.glob("evaluate/executor_output.json")).read_text())["artifacts"]["roc_blend_sign"]
    assert roc["artifacts"][0]["metadata"]["confidenceMetrics"]  # the UI's ROC curve
    work = local_run["work"] / "work" / "runs" / local_run["first"].record["pipeline_run_id"]
    assert sorted(p.name for p in (work / "models").iterdir()) == ["all", "fold0", "fold1"]
    assert (work / "jobs" / "fold0" / "round1" / "last.pt").is_file()  # the checkpoints a retry resumes from


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
