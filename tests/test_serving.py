"""The served model: in process through MLflow, and over HTTP with ``mlflow models serve`` (real head-CT DICOM)."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image

from blendsign import CLASSES, serving
from blendsign.config import Config, load_preset, override
from blendsign.dicom import hu_from_dataset
from blendsign.distill import load_model
from blendsign.model import build_model
from blendsign.targets import decode_boxes
from blendsign.tracking import Tracker
from blendsign.transforms import preprocess
from tests.conftest import real_file, write_ct

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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkpoint logged as the pyfunc to a temporary SQLite store."""
    root = tmp_path_factory.mktemp("serving")
    cfg = make_checkpoint(root / "model.pt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker.open(uri=uri)
    with tracker.run("teacher") as run:
        run_id = run.run_id
    before = (os.environ.get("MLFLOW_TRACKING_URI"), _global_tracking_uri())
    model_uri = serving.log_model(run_id=run_id, tracking_uri=uri, checkpoints=[root / "model.pt"])
    after = (os.environ.get("MLFLOW_TRACKING_URI"), _global_tracking_uri())
    return {"root": root, "cfg": cfg, "uri": uri, "run_id": run_id, "model_uri": model_uri,
            "tracking_before": before, "tracking_after": after, "client": tracker.client}


@pytest.fixture(scope="module")
def model(served: dict[str, Any]) -> Any:
    return serving.load(served["model_uri"], tracking_uri=served["uri"])


def _global_tracking_uri() -> str | None:
    from mlflow.tracking._tracking_service import utils

    return utils._tracking_uri


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


def reference(net: torch.nn.Module, cfg: Config, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``[3]`` and boxes ``[M, 5]`` in slice pixels, computed by hand from the training code."""
    hu = hu_from_dataset(pydicom.dcmread(io.BytesIO(data)))
    with torch.no_grad():
        out = net(preprocess(torch.from_numpy(hu), cfg.data)[None])
    boxes = decode_boxes(out["det"][0], stride=net.stride).numpy()
    rows, cols = hu.shape
    boxes[:, [0, 2]] *= cols / cfg.data.size
    boxes[:, [1, 3]] *= rows / cfg.data.size
    return out["logits"][0].softmax(0).numpy(), boxes


def test_log_model_leaves_global_state_alone(served: dict[str, Any]) -> None:
    assert served["tracking_after"] == served["tracking_before"]
    assert served["model_uri"].startswith("models:/")
    run = served["client"].get_run(served["run_id"])
    assert run.info.status == "FINISHED"


def test_preprocessing_is_the_training_one(served: dict[str, Any]) -> None:
    cfg = served["cfg"]
    for name in GOOD:
        data = dicom_bytes(name)
        expected = preprocess(torch.from_numpy(hu_from_dataset(pydicom.dcmread(real_file(name)))), cfg.data)
        assert torch.equal(serving.to_model_input(serving.read_slice(data), cfg.data), expected)
        assert torch.equal(serving.to_model_input(serving.read_slice(b64(data)), cfg.data), expected)


def test_predict_real_slices(served: dict[str, Any], model: Any) -> None:
    blobs = [dicom_bytes(n) for n in GOOD]
    out = model.predict(pd.DataFrame({"dicom": [*blobs, b64(blobs[0])]}))
    assert list(out.columns) == list(serving.OUTPUT_COLUMNS)
    assert out["error"].isna().all() and set(out["label"]) <= set(CLASSES)
    probs = out[list(serving.PROB_COLUMNS)].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs[3], probs[0], atol=1e-6)  # base64 text = bytes
    assert list(out["label"]) == [CLASSES[k] for k in probs.argmax(axis=1)]
    net, cfg = load_model(served["root"] / "model.pt", torch.device("cpu"))
    for data, p, boxes in zip(blobs, probs, out["boxes"], strict=False):
        ref_p, ref_boxes = reference(net, cfg, data)
        np.testing.assert_allclose(p, ref_p, atol=1e-5)
        got = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
        assert len(got) == len(ref_boxes) > 0
        np.testing.assert_allclose(got[:, :4], ref_boxes[:, :4], atol=0.02)
        rows, cols = hu_from_dataset(pydicom.dcmread(io.BytesIO(data))).shape
        assert (got[:, [0, 2]] <= cols).all() and (got[:, [1, 3]] <= rows).all() and (got[:, :4] >= 0).all()
    json.dumps(out["boxes"].tolist())  # plain lists


def _ct(tmp_path: Path, name: str, **kw: Any) -> bytes:
    hu = np.full((32, 32), 30, dtype=np.int16)
    write_ct(tmp_path / name, hu, study="1.2.3", series=f"1.2.3.{len(name)}", **kw)
    return (tmp_path / name).read_bytes()


def test_bad_rows_get_errors_and_spare_the_others(model: Any, tmp_path: Path) -> None:
    good = dicom_bytes("693_UNCI.dcm")
    rows = [
        _ct(tmp_path, "scout", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        _ct(tmp_path, "cta", contrast="IOPAMIDOL"),
        _ct(tmp_path, "coronal", orientation=(1, 0, 0, 0, 0, -1)),
        real_file("CT_small.dcm").read_bytes(),  # as pydicom ships it: contrast-enhanced
        good,
        np.random.default_rng(0).bytes(4096),
        dicom_bytes("MR_small.dcm"),
        dicom_bytes("rtplan.dcm"),
        ct_without_pixels(),
        "this is not base64!",
        ct_too_large(),
        b64(b"just text"),
        good,
    ]
    reasons = ["localizer image", "contrast image", "non-axial image", "contrast image",
               "", "not a DICOM", "not a CT image (Modality MR)", "not a CT image (Modality RTPLAN)",
               "no pixel data", "not valid base64", "outside 1–4096 px", "not a DICOM", ""]
    inner = model.unwrap_python_model()
    inner.batch_size = 4  # bad rows spread over several batches
    try:
        out = model.predict(pd.DataFrame({"dicom": rows}))
    finally:
        inner.batch_size = serving.DEFAULT_BATCH_SIZE
    alone = model.predict(pd.DataFrame({"dicom": [good]}))
    for i, reason in enumerate(reasons):
        if reason:
            assert reason in out["error"][i], (i, out["error"][i])
            assert out.loc[i, list(serving.PROB_COLUMNS)].isna().all() and out["boxes"][i] == []
        else:
            assert out["error"][i] is None
            np.testing.assert_allclose(out.loc[i, list(serving.PROB_COLUMNS)].to_numpy(dtype=float),
                                       alone.loc[0, list(serving.PROB_COLUMNS)].to_numpy(dtype=float), atol=1e-5)


def test_explain_returns_png_at_slice_size(model: Any) -> None:
    out = model.predict(pd.DataFrame({"dicom": [dicom_bytes("CT_small.dcm"), b"junk"]}), params={"explain": True})
    image = Image.open(io.BytesIO(base64.b64decode(out["gradcam_png"][0])))
    assert image.format == "PNG" and image.size == (128, 128) and image.mode == "RGB"
    assert out["gradcam_png"][1] is None and out["error"][1]


def test_ensemble_averages_and_pickles_small(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "a.pt", seed=1)
    make_checkpoint(tmp_path / "b.pt", seed=2)
    df = pd.DataFrame({"dicom": [dicom_bytes("CT_small.dcm")]})
    assert len(pickle.dumps(serving.BlendSignModel())) < 1000
    probs = []
    for files in (["a.pt"], ["b.pt"], ["a.pt", "b.pt"]):
        m = serving.BlendSignModel()
        m.load_checkpoints([tmp_path / f for f in files])
        probs.append(m.predict(None, df)[list(serving.PROB_COLUMNS)].to_numpy(dtype=float)[0])
    assert len(pickle.dumps(m)) < 1000  # live networks are never pickled
    np.testing.assert_allclose(probs[2], (probs[0] + probs[1]) / 2, atol=1e-6)


def test_predict_paths_groups_scans_without_uids(served: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "export"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    (folder / "a" / "one").write_bytes(dicom_bytes("CT_small.dcm"))
    (folder / "a" / "two.dcm").write_bytes(dicom_bytes("CT_small.dcm"))
    (folder / "b" / "x.dcm").write_bytes(dicom_bytes("693_UNCI.dcm"))
    (folder / "b" / "notes.txt").write_text("not DICOM")
    slices, scans = serving.predict_paths(served["model_uri"], [folder], tracking_uri=served["uri"], chunk=2)
    assert list(slices["file"]) == ["a/one", "a/two.dcm", "b/notes.txt", "b/x.dcm"]
    assert list(slices["scan"]) == ["scan000", "scan000", "", "scan001"]
    by_scan = scans.set_index("scan")
    assert by_scan.loc["scan000", "slices"] == 2 and by_scan.loc["scan000", "errors"] == 0
    assert by_scan.loc["", "errors"] == 1
    p = slices.set_index("file")
    assert by_scan.loc["scan001", "max_p_blend_sign"] == pytest.approx(float(p.loc["b/x.dcm", "p_blend_sign"]))
    assert by_scan.loc["scan001", "max_p_ich"] == pytest.approx(1 - float(p.loc["b/x.dcm", "p_non_ich"]))
    text = slices.to_csv() + scans.to_csv()
    for name in ("CT_small.dcm", "693_UNCI.dcm"):
        ds = pydicom.dcmread(real_file(name), stop_before_pixels=True)
        assert str(ds.StudyInstanceUID) not in text and str(ds.SeriesInstanceUID) not in text


def test_cli_predict_prints_slices_and_scans(served: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from blendsign.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["uri"])
    files = [str(real_file("J2K_pixelrep_mismatch.dcm")), str(real_file("MR_small.dcm"))]
    assert main(["predict", "--model", served["model_uri"], "--json", *files]) == 0
    out = json.loads(capsys.readouterr().out)
    good, bad = out["slices"]
    assert good["error"] is None and good["label"] in CLASSES
    assert bad["error"] == "not a CT image (Modality MR)" and bad["p_blend_sign"] is None
    assert {s["scan"] for s in out["scans"]} == {"scan000", "scan001"}


# --- over HTTP --------------------------------------------------------------------------------------------


def _request(url: str, body: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def server(served: dict[str, Any], tmp_path: Path) -> Any:
    """``mlflow models serve --env-manager local`` on 127.0.0.1 (``serving.model_server``)."""
    with serving.model_server(served["model_uri"], tracking_uri=served["uri"], log=tmp_path / "serve.log") as base:
        yield base


def test_model_server_reports_a_server_that_does_not_start(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(RuntimeError, match="model server exited"), \
            serving.model_server("models:/no-such-model/1", tracking_uri=uri, log=tmp_path / "serve.log"):
        pytest.fail("the block must not run")


def _invoke(base: str, cells: list[Any], params: dict[str, Any] | None = None) -> tuple[int, Any]:
    payload: dict[str, Any] = {"dataframe_split": {"columns": ["dicom"], "data": [[c] for c in cells]}}
    if params is not None:
        payload["params"] = params
    status, body = _request(f"{base}/invocations", json.dumps(payload).encode())
    return status, json.loads(body)


def test_http_endpoint(server: str, served: dict[str, Any], model: Any) -> None:
    good = [b64(dicom_bytes(n)) for n in GOOD]
    bad = [b64(np.random.default_rng(1).bytes(2048)), b64(dicom_bytes("MR_small.dcm")),
           b64(dicom_bytes("rtplan.dcm")), "%%% not base64 %%%", None]
    status, body = _invoke(server, [*good, *bad])
    assert status == 200, body
    preds = body["predictions"]
    assert len(preds) == len(good) + len(bad)
    local = model.predict(pd.DataFrame({"dicom": [dicom_bytes(n) for n in GOOD]}))
    for i, row in enumerate(preds[: len(good)]):
        assert row["error"] is None and row["label"] in CLASSES
        p = [row[c] for c in serving.PROB_COLUMNS]
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(p, local.loc[i, list(serving.PROB_COLUMNS)].to_numpy(dtype=float), atol=1e-5)
        assert row["boxes"] == local["boxes"][i]
    for row in preds[len(good) :]:
        assert row["error"] and row["p_blend_sign"] is None and row["label"] is None  # null, never NaN

    status, body = _invoke(server, [good[2], bad[0]], params={"explain": True})
    assert status == 200, body
    png = Image.open(io.BytesIO(base64.b64decode(body["predictions"][0]["gradcam_png"])))
    assert png.size == (128, 128)
    assert body["predictions"][1]["gradcam_png"] is None

    # Requests that cannot be scored at all are refused, and the server stays up.
    assert _request(f"{server}/invocations", b"this is not JSON")[0] == 400
    assert _request(f"{server}/invocations", json.dumps({"dataframe_split": {"columns": ["x"], "data": [[1]]}})
                    .encode())[0] == 400
    assert _request(f"{server}/ping")[0] == 200
    status, body = _invoke(server, [good[1]])
    assert status == 200 and body["predictions"][0]["error"] is None
