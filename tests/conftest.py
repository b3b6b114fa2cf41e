"""Shared fixtures: a tiny CT DICOM writer for precisely controlled cases, and real pydicom files."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from blendsign import CLASSES, METRICS
from blendsign.storage import s3_client, write_json_atomic

# Identifying values written into every file made by ``write_ct``; de-identification tests look for them.
IDENTIFIERS = {
    "PatientName": "Testperson^Hildegard",
    "PatientBirthDate": "19581103",
    "InstitutionName": "Sankt Testus Klinikum",
    "AccessionNumber": "ACC99887766",
    "ReferringPhysicianName": "Doktor^Beispiel",
}


def real_file(name: str) -> Path:
    """A file from pydicom's (or pydicom-data's) bundled test data, by exact name (never a glob)."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return Path(str(path))


def write_ct(
    path: Path,
    hu: np.ndarray,
    *,
    study: str,
    series: str,
    sop: str | None = None,
    patient_id: str = "PID-0001",
    z: float = 0.0,
    instance: int = 1,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    unsigned12: bool = False,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    contrast: str | None = None,
    age: str = "054Y",
    modality: str = "CT",
    **extra: Any,
) -> str:
    """Write one single-frame CT slice holding ``hu`` exactly; returns its SOPInstanceUID."""
    sop = sop or generate_uid(entropy_srcs=[str(path)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = modality
    ds.PatientID, ds.PatientAge = patient_id, age
    for tag, value in IDENTIFIERS.items():
        setattr(ds, tag, value)
    ds.StudyDate = "20200314"
    ds.ImageType = list(image_type)
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [-100.0, -100.0, z]
    ds.PixelSpacing = [0.45, 0.45]
    ds.SliceThickness = 5.0
    ds.InstanceNumber = instance
    ds.SeriesNumber = 2
    if contrast:
        ds.ContrastBolusAgent = contrast
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.RescaleSlope = 1
    if unsigned12:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 12, 11, 0, -1024
        stored = (hu.astype(np.int32) + 1024).astype(np.uint16)
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 16, 15, 1, 0
        stored = hu.astype(np.int16)
    ds.PixelData = stored.tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return sop


@pytest.fixture
def ct_writer() -> Callable[..., str]:
    return write_ct


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their pseudonym key explicitly."""
    monkeypatch.delenv("BLENDSIGN_PSEUDONYM_KEY", raising=False)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic cohort taken through synth → ingest → fuse → folds (k=3), once per session.

    64 px slices; extra blend sign (class ratio 6:3:1) so that every training split holds all three classes.
    """
    from dataclasses import replace

    from blendsign.config import load_preset
    from blendsign.folds import make_folds
    from blendsign.ingest import ingest
    from blendsign.labels import fuse
    from blendsign.synth import synthesize

    root = tmp_path_factory.mktemp("cohort")
    cfg = load_preset("ci")
    synthesize(root / "src", replace(cfg.synth, scans=18, class_ratio=(6.0, 3.0, 1.0), seed=3), progress=False)
    ingest(root / "src" / "dicom", root / "ingest", cfg.ingest, progress=False)
    fuse(root / "src" / "annotations.csv", root / "ingest", root / "labels", cfg.labels)
    make_folds(root / "labels", root / "folds", replace(cfg.folds, k=3))
    return {"root": root, "ingest": root / "ingest", "labels": root / "labels", "folds": root / "folds"}


# --- a real S3-compatible server (moto's server mode) on 127.0.0.1 ----------------------------------------

BUCKET = "blendsign-test"
ACCESS_KEY = "AKIABLENDSIGNTEST0001"
SECRET_KEY = "blendsign/secret+Key/never-logged-0123456789"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port), started once and stopped at the end of the session."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO record per request otherwise
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Iterator[Any]:
    """The standard AWS/MLflow environment pointing at the server (for this module only) and a bucket."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                    "BLENDSIGN_ARTIFACT_ROOT", "MLFLOW_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        mp.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = s3_client()
        client.create_bucket(Bucket=BUCKET)
        yield client


def keys(client: Any, prefix: str) -> dict[str, str]:
    """ETag by key under ``prefix``."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


# --- whole pipeline runs (kfp.local and `blendsign run`): the preset and the MLflow run tree they leave -----

LOCAL_PRESET = Path(__file__).parent / "fixtures" / "kfp-local.toml"  # ci, one epoch per round


def run_tree(tracking_uri: str, experiment: str, parent_run_id: str) -> dict[str, Any]:
    """The MLflow runs under a parent run, as nested run names, and every run's status."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)

    def children(run_id: str) -> dict[str, Any]:
        return {r.info.run_name: children(r.info.run_id) for r in runs
                if r.data.tags.get("mlflow.parentRunId") == run_id}

    return {"tree": children(parent_run_id), "statuses": {r.info.status for r in runs}}


EXPECTED_TREE = {"cross-validation": {"fold0": {"fold0-round0": {}, "fold0-round1": {}},
                                      "fold1": {"fold1-round0": {}, "fold1-round1": {}}},
                 "refit": {"refit-round0": {}, "refit-round1": {}}, "register": {}}


# --- the served model (tests/test_serving.py, test_model_package.py, test_predict.py, test_model_server.py) ------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkpoint logged as the pyfunc to a temporary SQLite store (tests/served.py)."""
    from tests.served import log_served

    return log_served(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def model(served: dict[str, Any]) -> Any:
    """The logged model loaded in process, on the CPU."""
    from blendsign import model_package

    return model_package.load(served["model_uri"], tracking_uri=served["uri"], model_config={"device": "cpu"})


# --- an evaluation folder as `evaluate` leaves it (tests/test_evaluate.py, test_run_tree.py) -------------------------


def evaluation_folder(folder: Path) -> Path:
    """``metrics.json`` of a two-fold evaluation: every CV metric 0.8 ± 0.1, ``auc_non_ich`` undefined (NaN)."""
    cv = {f"{m}_{c}": [0.8, 0.1] for m in METRICS for c in CLASSES}
    cv["auc_non_ich"] = [float("nan"), float("nan")]
    write_json_atomic(folder / "metrics.json", {"per_fold": {"0": {}, "1": {}}, "cv": cv,
                                                "ci": {k: [0.7, 0.9] for k in cv}, "scan": {"auc_any_ich": 0.9}})
    return folder
