"""The registered model as MLflow stores it, loaded where blendsign is not installed (a fresh virtualenv)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import tomllib
import venv
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement

from blendsign import model_package, serving
from tests.conftest import real_file

ROOT = Path(__file__).resolve().parents[1]


def test_log_model_leaves_global_state_alone(served: dict[str, Any]) -> None:
    assert served["tracking_after"] == served["tracking_before"]
    assert served["model_uri"].startswith("models:/")
    run = served["client"].get_run(served["run_id"])
    assert run.info.status == "FINISHED"


def test_requirements_pin_every_runtime_dependency_of_the_package() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = ["mlflow", *(n for n in (Requirement(d).name for d in declared) if n not in ("kfp", "kfp-kubernetes"))]
    assert model_package.requirements() == [f"{n}=={version(n)}" for n in dict.fromkeys(names)]


@pytest.fixture(scope="module")
def folder(served: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The logged model downloaded to a folder outside the checkout."""
    return model_package.download(served["model_uri"], tmp_path_factory.mktemp("downloaded") / "model",
                                  tracking_uri=served["uri"])


def test_the_model_carries_its_code_requirements_and_weights(folder: Path) -> None:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["code"] == "code" and (folder / "code" / "blendsign" / "serving.py").is_file()
    assert (folder / "code" / "blendsign" / "model_package.py").is_file()
    assert not list((folder / "code").rglob("__pycache__"))
    assert not (folder / "code" / "blendsign" / "synth.py").exists()  # its invented identities stay home
    assert (folder / "requirements.txt").read_text().split() == model_package.requirements()
    assert sorted(p.name for p in (folder / "artifacts").iterdir()) == ["fold0.pt"]
    assert mlmodel["metadata"]["blendsign_version"] == "0.1.0" and mlmodel["metadata"]["folds"] == 1


SCORE = textwrap.dedent("""
    import importlib.util, json, sys
    assert importlib.util.find_spec("blendsign") is None, "blendsign is installed in the fresh environment"
    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    import blendsign
    data = open(sys.argv[2], "rb").read()
    out = model.predict(pd.DataFrame({"dicom": [data]}))
    print(json.dumps({"blendsign": blendsign.__file__, "row": json.loads(out.to_json(orient="records"))[0],
                      "device": str(model.unwrap_python_model().device)}))
""")


@pytest.mark.slow
def test_a_fresh_environment_from_the_models_requirements_loads_and_scores_it(
        folder: Path, model: Any, tmp_path: Path) -> None:
    """As ``mlflow models serve --env-manager virtualenv``, build-docker, MLServer and KServe build it: a new
    virtualenv, only the model's requirements.txt installed, the model loaded from its folder, a real slice."""
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)  # no system site-packages, no blendsign
    python = env_dir / "bin" / "python"
    t = time.monotonic()
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "-r", str(folder / "requirements.txt")], capture_output=True, text=True,
                             timeout=1500)
    assert install.returncode == 0, install.stderr[-3000:]
    print(f"fresh environment installed in {time.monotonic() - t:.0f} s")
    (tmp_path / "score.py").write_text(SCORE)
    slice_file = real_file("J2K_pixelrep_mismatch.dcm")
    run = subprocess.run([str(python), str(tmp_path / "score.py"), str(folder), str(slice_file)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600,
                         env={"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
                              "BLENDSIGN_SERVE_DEVICE": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["blendsign"]).is_relative_to(folder / "code")  # the model's own copy of the package
    assert result["device"] == "cpu" and result["row"]["error"] is None
    local = model.predict(pd.DataFrame({"dicom": [slice_file.read_bytes()]}))
    cols = list(serving.PROB_COLUMNS)
    np.testing.assert_allclose([result["row"][c] for c in cols], local[cols].to_numpy(float)[0], atol=1e-5)
    assert result["row"]["label"] == local["label"][0]
    assert sys.prefix not in run.stdout
