"""The registered model as MLflow stores it: a self-contained pyfunc that loads where ``blendsign`` is not installed.

A logged model holds

- ``artifacts/fold0.pt``, ``fold1.pt``, …: slim checkpoints (``model`` state dict and ``config``) of the ensemble;
- ``code/blendsign/``: this package's source (``code_paths``), which MLflow puts first on ``sys.path`` when it
  loads the model, so :class:`blendsign.serving.BlendSignModel` unpickles from the model's own code;
- ``requirements.txt``: every runtime dependency of the package (``pyproject.toml``) pinned to the version it was
  trained with, and MLflow itself; the orchestration-only ``kfp`` packages are left out;
- the signature (one ``dicom`` column in, :data:`blendsign.serving.OUTPUT_COLUMNS` out, parameter ``explain``)
  and one real head-CT slice as input example.

Built the way ``mlflow models serve --env-manager virtualenv``, ``mlflow models build-docker``, MLServer and
KServe build it (a fresh environment from ``requirements.txt``), the model loads and scores
(tests/test_model_package.py does exactly that).
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from packaging.requirements import Requirement

import blendsign
from blendsign import CLASSES, __version__, checkpoint
from blendsign.errors import InputError
from blendsign.serving import (
    DEFAULT_BATCH_SIZE,
    DICOM_COLUMN,
    GRADCAM_COLUMN,
    PROB_COLUMNS,
    BlendSignModel,
    ServeSettings,
    check_compatible,
    member_name,
)

__all__ = ["download", "example_slice", "load", "log_model", "requirements", "signature"]

ORCHESTRATION_ONLY = frozenset({"kfp", "kfp-kubernetes"})  # the pipeline's, never imported by the served model


def signature() -> Any:
    """The model signature: input ``dicom`` (string: base64 text, or bytes in process), the output columns and
    the ``explain`` parameter (boolean, default False)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    # ``string``, not ``binary``: MLflow base64-decodes a binary column for the whole request at once, so one bad
    # row would fail every row with HTTP 400; as a string each row is decoded (and may fail) on its own.
    inputs = Schema([ColSpec(DataType.string, DICOM_COLUMN)])
    outputs = Schema([
        *(ColSpec(DataType.double, c, required=False) for c in PROB_COLUMNS),
        ColSpec(DataType.string, "label", required=False),
        ColSpec(Array(Array(DataType.double)), "boxes", required=False),
        ColSpec(DataType.double, "ood_score", required=False),
        ColSpec(DataType.boolean, "out_of_distribution", required=False),
        ColSpec(DataType.string, "error", required=False),
        ColSpec(DataType.string, GRADCAM_COLUMN, required=False),
    ])
    params = ParamSchema([ParamSpec("explain", DataType.boolean, False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def example_slice() -> bytes:
    """A real non-contrast head-CT slice (512², JPEG 2000 lossless): pydicom's bundled
    ``J2K_pixelrep_mismatch.dcm`` (no download). ``CT_small.dcm`` is contrast-enhanced: the model declines it."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("J2K_pixelrep_mismatch.dcm")
    if path is None:
        raise FileNotFoundError("pydicom's J2K_pixelrep_mismatch.dcm test file is missing")
    return Path(str(path)).read_bytes()


def requirements() -> list[str]:
    """``requirements.txt`` of the served model: the package's runtime dependencies and MLflow, pinned.

    Read from the installed ``blendsign``'s metadata (``pyproject.toml``'s ``dependencies``), so a dependency
    added there reaches the model without a second list. A dependency that is not installed is an error: the
    model would name a version it was never tested with.
    """
    try:
        declared = requires("blendsign") or []
    except PackageNotFoundError:
        raise RuntimeError("blendsign is not installed (pip install .): its dependencies cannot be read") from None
    names = ["mlflow"]
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (dev tools)
        if req.name not in ORCHESTRATION_ONLY and req.name not in names:
            names.append(req.name)
    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise RuntimeError(f"{name}, a dependency of blendsign, is not installed: pip install .") from None
    return pinned


# Left out of the shipped code: byte code, and the synthetic-cohort generator, whose source holds the invented
# names, addresses and IDs it writes into synthetic DICOM (no module the served model imports needs it).
NOT_SHIPPED = ("__pycache__", "*.pyc", "synth.py")


def _package_copy(root: Path) -> Path:
    """This package's source copied to ``root/blendsign`` (:data:`NOT_SHIPPED` left out): what ``code_paths``
    ships."""
    source = Path(blendsign.__file__).parent
    target = root / "blendsign"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    return target


@contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the block (``log_model`` knows no other); restore after.

    ``mlflow.set_tracking_uri`` keeps ``MLFLOW_TRACKING_URI`` equal to the URI it sets, so that variable is the
    whole state to restore (unset → unset).
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it, as MLflow's own code does


def log_model(
    *,
    run_id: str,
    tracking_uri: str,
    checkpoints: Sequence[Path],
    name: str = "model",
    registered_model_name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> str:
    """Log the served model (fold ensemble of ``checkpoints``) to the existing run ``run_id``; returns its URI.

    The checkpoints are copied (model + config only) as artifacts ``fold0.pt``, ``fold1.pt``, …, the package as
    code; the input example is one real CT slice (base64). MLflow loads the model once to check the example. A
    run that was RUNNING before stays RUNNING.
    """
    if not checkpoints:
        raise InputError("log_model needs at least one checkpoint")
    example = pd.DataFrame({DICOM_COLUMN: [base64.b64encode(example_slice()).decode("ascii")]})
    with tempfile.TemporaryDirectory(prefix="blendsign-serve-") as tmp:
        artifacts: dict[str, str] = {}
        configs = []
        for k, src in enumerate(checkpoints):
            dst = Path(tmp) / f"{member_name(k)}.pt"
            configs.append(checkpoint.write_slim(src, dst))
            artifacts[member_name(k)] = str(dst)
        check_compatible(configs)
        code = _package_copy(Path(tmp) / "code")
        with _tracking(tracking_uri):
            client = mlflow.MlflowClient(tracking_uri)
            was_running = client.get_run(run_id).info.status == "RUNNING"
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=BlendSignModel(batch_size=batch_size),
                    artifacts=artifacts,
                    code_paths=[str(code)],
                    # the settings a server may pass at load (MLflow accepts only keys logged here); empty: the
                    # environment's, else the defaults (blendsign.serving.ServeSettings)
                    model_config={f.name: "" for f in fields(ServeSettings)},
                    signature=signature(),
                    input_example=(example, {"explain": False}),
                    pip_requirements=requirements(),
                    registered_model_name=registered_model_name,
                    metadata={"blendsign_version": __version__, "classes": list(CLASSES),
                              "folds": len(configs), "preset": configs[0].preset},
                )
            if was_running:
                client.update_run(run_id, status="RUNNING")
    return str(info.model_uri)


def load(model_uri: str, *, tracking_uri: str | None = None, model_config: dict[str, Any] | None = None) -> Any:
    """The served model in process (``mlflow.pyfunc.PyFuncModel``): ``.predict(df, params={"explain": True})``.

    ``tracking_uri`` resolves ``models:/`` and ``runs:/`` URIs (default: MLflow's, i.e. ``MLFLOW_TRACKING_URI``);
    ``model_config`` holds serving settings (:class:`blendsign.serving.ServeSettings`, e.g. ``{"device": "cpu"}``).
    """
    if tracking_uri is None:
        return mlflow.pyfunc.load_model(model_uri, model_config=model_config)
    # download_artifacts(tracking_uri=...) ignores it for ``models:/m-…`` URIs (MLflow 3.17): set it globally.
    with _tracking(tracking_uri):
        return mlflow.pyfunc.load_model(model_uri, model_config=model_config)


def download(model_uri: str, dst: str | Path, *, tracking_uri: str | None = None) -> Path:
    """The model's folder (MLmodel, code, artifacts, requirements.txt) downloaded to ``dst``: what a serving
    environment receives (KServe's storage initializer, ``mlflow models build-docker``)."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    with _tracking(tracking_uri or mlflow.get_tracking_uri()):
        return Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
