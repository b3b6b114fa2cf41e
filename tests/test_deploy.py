"""KServe: manifests built from the kserve SDK's classes, the champion's storage URI from a real registry on S3."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml

from blendsign import deploy
from blendsign.registry import register_version
from tests.conftest import BUCKET

ROOT = Path(__file__).resolve().parents[1]


def test_render_fills_in_the_template() -> None:
    text = deploy.render("s3://models/blendsign/m-1/artifacts", image="registry.example/blendsign@sha256:ab",
                         name="ich", namespace="radiology", gpus=0, service_account="kserve-s3", version="7")
    runtime, isvc = yaml.safe_load_all(text)
    assert (runtime["kind"], isvc["kind"]) == ("ServingRuntime", "InferenceService")
    assert runtime["metadata"] == {"name": "ich", "namespace": "radiology"}
    container = runtime["spec"]["containers"][0]
    assert container["image"] == "registry.example/blendsign@sha256:ab"
    assert container["command"] == ["blendsign", "serve", "/mnt/models", "--host", "0.0.0.0", "--port", "8080"]
    assert {e["name"]: e["value"] for e in container["env"]} == {"BLENDSIGN_MAX_REQUEST_BYTES": str(192 << 20),
                                                                  "BLENDSIGN_REQUEST_TIMEOUT": "300"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8080}
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == "s3://models/blendsign/m-1/artifacts"
    assert predictor["model"]["runtime"] == "ich" and predictor["timeout"] == 300
    assert predictor["model"]["modelFormat"]["name"] == runtime["spec"]["supportedModelFormats"][0]["name"]
    assert "nvidia.com/gpu" not in predictor["model"]["resources"]["limits"] and predictor["serviceAccountName"] == \
        "kserve-s3"
    assert isvc["metadata"]["labels"] == {"blendsign/model-version": "7"}
    assert isvc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "192m"
    gpu = yaml.safe_load_all(deploy.render("s3://m", image="i"))
    assert list(gpu)[1]["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_proxied_artifact_uris_map_to_the_servers_destination() -> None:
    assert deploy.direct_uri("mlflow-artifacts:/1/models/m-9/artifacts", "s3://b/mlflow/") == \
        "s3://b/mlflow/1/models/m-9/artifacts"
    assert deploy.direct_uri("mlflow-artifacts://mlflow:5000/1/m/artifacts", "s3://b/mlflow") == \
        "s3://b/mlflow/1/m/artifacts"
    assert deploy.direct_uri("s3://b/x", "s3://elsewhere") == "s3://b/x"


def test_deploy_resolves_the_champion_to_its_folder_on_s3(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from blendsign import model_package
    from blendsign.cli import main
    from blendsign.tracking import Tracker
    from tests.served import make_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("BLENDSIGN_ARTIFACT_ROOT", f"s3://{BUCKET}/mlflow")
    tracker = Tracker.open("deploy", uri)
    make_checkpoint(tmp_path / "model.pt")
    with tracker.run("register") as run:
        model_package.log_model(run_id=run.run_id, tracking_uri=uri, checkpoints=[tmp_path / "model.pt"],
                                registered_model_name="blendsign")
    register_version(tracker.client, name="blendsign", run_id=run.run_id, metric="cv_auc_blend_sign", value=0.9,
                     margin=0.0, tags={}, card="card")
    version, storage = deploy.storage_uri(tracker.client, "blendsign")
    assert version == "1" and storage.startswith(f"s3://{BUCKET}/mlflow/")
    prefix = storage.removeprefix(f"s3://{BUCKET}/") + "/"
    keys = {o["Key"].removeprefix(prefix) for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert {"MLmodel", "requirements.txt", "artifacts/fold0.pt", "code/blendsign/serving.py"} <= keys  # /mnt/models

    out = tmp_path / "isvc.yaml"
    assert main(["registry", "deploy", "--tracking-uri", uri, "--image", "blendsign:1", "--output", str(out)]) == 0
    assert f"blendsign@champion (v1, {storage})" in capsys.readouterr().out
    assert list(yaml.safe_load_all(out.read_text()))[1]["spec"]["predictor"]["model"]["storageUri"] == storage
    with pytest.raises(Exception, match="alias"):
        deploy.storage_uri(tracker.client, "blendsign", "no-such-alias")


@pytest.mark.slow
def test_the_template_is_what_the_kserve_sdk_builds(tmp_path: Path) -> None:
    """kserve.yaml, rebuilt in a fresh environment with the kserve SDK (it pins pandas<3, so it cannot share
    this one), is byte for byte the committed file."""
    env_dir = tmp_path / "kserve"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              deploy.KSERVE_SDK, "pyyaml"], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    code = "import sys; from blendsign.deploy import template_text; sys.stdout.write(template_text())"
    built = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout == deploy.TEMPLATE.read_text()
