"""Helpers for the served-model tests: a logged model, real head-CT DICOM bytes, broken variants of them."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pydicom
import torch

from blendsign import model_package
from blendsign.config import Config, load_preset, override
from blendsign.model import build_model
from blendsign.tracking import Tracker
from tests.conftest import real_file

# JPEG 2000 512², native 512², native 128² (CT_small is contrast-enhanced, which the model declines: its
# contrast tag is removed to score its pixels; see test_bad_rows for the untouched file)
GOOD = ("J2K_pixelrep_mismatch.dcm", "693_UNCI.dcm", "CT_small.dcm")
PLAIN = "CT_small.dcm"


def make_checkpoint(path: Path, seed: int = 0) -> Config:
    """A ``train``-style checkpoint of a random resnet18 whose center heatmap fires everywhere (boxes to check)."""
    torch.manual_seed(seed)
    cfg = override(load_preset("ci"), model={"det_channels": 16})
    model = build_model(cfg.model)
    with torch.no_grad():
        model.det_head.out.bias[0] = 4.0  # sigmoid ≈ 0.98 > the 0.3 box threshold
    torch.save({"format": 1, "model": model.state_dict(), "optimizer": None, "epoch": 1,
                "history": [{"loss_total": 1.0}], "config": cfg.to_dict(), "run_id": None, "fold": 0}, path)
    return cfg


def log_served(root: Path) -> dict[str, Any]:
    """One checkpoint logged as the pyfunc to a SQLite store under ``root``."""
    cfg = make_checkpoint(root / "model.pt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker.open(uri=uri)
    with tracker.run("teacher") as run:
        run_id = run.run_id
    import mlflow

    before = (mlflow.get_tracking_uri(), mlflow.tracking.is_tracking_uri_set())
    model_uri = model_package.log_model(run_id=run_id, tracking_uri=uri, checkpoints=[root / "model.pt"])
    after = (mlflow.get_tracking_uri(), mlflow.tracking.is_tracking_uri_set())
    return {"root": root, "cfg": cfg, "uri": uri, "run_id": run_id, "model_uri": model_uri,
            "tracking_before": before, "tracking_after": after, "client": tracker.client}


def dicom_bytes(name: str) -> bytes:
    """A real file's bytes; ``PLAIN`` without its ContrastBolusAgent."""
    if name != PLAIN:
        return real_file(name).read_bytes()
    ds = pydicom.dcmread(real_file(name))
    del ds.ContrastBolusAgent
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def ct_without_pixels() -> bytes:
    ds = pydicom.dcmread(real_file("CT_small.dcm"))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def ct_too_large() -> bytes:
    ds = pydicom.dcmread(real_file("CT_small.dcm"))
    ds.Rows = 5000  # refused from the header, before the (now inconsistent) pixels are decoded
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()
