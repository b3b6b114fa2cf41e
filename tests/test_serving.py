"""The served model's pyfunc: request decoding, the ensemble, its settings and device (real head-CT DICOM)."""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image

from blendsign import CLASSES, checkpoint, serving
from blendsign.config import Config
from blendsign.dicom import hu_from_dataset
from blendsign.model import load_trained
from blendsign.serving import RequestError, ServeSettings
from blendsign.targets import decode_boxes
from blendsign.transforms import preprocess
from tests.conftest import real_file, write_ct
from tests.served import GOOD, b64, ct_too_large, ct_without_pixels, dicom_bytes, make_checkpoint


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
    net, cfg, _ = load_trained(served["root"] / "model.pt", torch.device("cpu"))
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
    settings = inner.settings
    inner.settings = replace(settings, batch_size=4)  # bad rows spread over several batches
    try:
        out = model.predict(pd.DataFrame({"dicom": rows}))
    finally:
        inner.settings = settings
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


def test_settings_come_from_model_config_over_environment_over_defaults() -> None:
    env = {"BLENDSIGN_SERVE_DEVICE": "cuda:1", "BLENDSIGN_MAX_ROWS": "40"}
    assert ServeSettings.resolve(None, env={}) == ServeSettings("auto", 256, serving.DEFAULT_BATCH_SIZE)
    assert ServeSettings.resolve(None, env=env) == ServeSettings("cuda:1", 40, serving.DEFAULT_BATCH_SIZE)
    assert ServeSettings.resolve({"device": "cpu", "batch_size": "2"}, env=env) == ServeSettings("cpu", 40, 2)
    assert ServeSettings.resolve({}, env={}, base=ServeSettings(batch_size=3)).batch_size == 3  # the pickled one
    assert ServeSettings.resolve({"device": "", "max_rows": ""}, env=env) == ServeSettings("cuda:1", 40, 8)  # logged
    with pytest.raises(ValueError, match=r"max_rows .*BLENDSIGN_MAX_ROWS.* integer"):
        ServeSettings.resolve(None, env={"BLENDSIGN_MAX_ROWS": "many"})
    with pytest.raises(ValueError, match=r"batch_size .* ≥ 1"):
        ServeSettings.resolve({"batch_size": 0}, env={})


def test_a_request_over_max_rows_or_without_the_column_is_refused_without_its_content(model: Any) -> None:
    inner = model.unwrap_python_model()
    settings = inner.settings
    inner.settings = replace(settings, max_rows=2)
    secret = "Testperson^Hildegard"
    try:
        with pytest.raises(RequestError, match=r"3 slices in one request: at most 2 .*BLENDSIGN_MAX_ROWS") as exc:
            model.predict(pd.DataFrame({"dicom": [secret] * 3}))
        assert secret not in str(exc.value)
        assert model.predict(pd.DataFrame({"dicom": [dicom_bytes("693_UNCI.dcm")] * 2}))["error"].isna().all()
    finally:
        inner.settings = settings
    with pytest.raises(RequestError, match="needs a column 'dicom'") as exc:
        inner.predict(None, pd.DataFrame({secret: [1]}))
    assert secret not in str(exc.value)


def test_request_errors_reach_the_sink_of_their_context() -> None:
    sink: list[str] = []
    token = serving.REQUEST_ERRORS.set(sink)
    try:
        RequestError("too many slices")
    finally:
        serving.REQUEST_ERRORS.reset(token)
    RequestError("outside any request")  # no sink: nothing recorded, nothing fails
    assert sink == ["too many slices"]


def test_trained_weights_load_on_the_chosen_device_without_random_initialisation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_checkpoint(tmp_path / "a.pt")
    m = serving.BlendSignModel()
    with caplog.at_level(logging.INFO):
        m.load_checkpoints([tmp_path / "a.pt"], device="cpu")
    assert m.device == torch.device("cpu")
    assert "random initialisation" not in caplog.text
    assert "serving 1 trained resnet18 model(s) (preset ci) on cpu (CPU), 8 slices per forward pass" in caplog.text
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is usable here"):
            serving.BlendSignModel().load_checkpoints([tmp_path / "a.pt"], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_serves_on_the_gpu_with_the_cpu_result(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "a.pt")
    df = pd.DataFrame({"dicom": [dicom_bytes(n) for n in GOOD]})
    gpu, cpu = serving.BlendSignModel(), serving.BlendSignModel()
    gpu.load_checkpoints([tmp_path / "a.pt"])
    cpu.load_checkpoints([tmp_path / "a.pt"], device="cpu")
    assert gpu.device is not None and gpu.device.type == "cuda"
    cols = list(serving.PROB_COLUMNS)
    np.testing.assert_allclose(gpu.predict(None, df)[cols].to_numpy(float), cpu.predict(None, df)[cols]
                               .to_numpy(float), atol=1e-3)


def test_a_head_cropping_model_serves_boxes_and_grad_cam_in_slice_pixels(tmp_path: Path) -> None:
    """With data.crop_head the input is the head's square: the served boxes are the hand-made ones mapped back
    from that square (transforms.unscale_boxes), and the Grad-CAM PNG keeps the slice's size."""
    from blendsign.transforms import head_crop, unscale_boxes

    make_checkpoint(tmp_path / "model.pt")
    state = checkpoint.load(tmp_path / "model.pt")
    state["config"]["data"]["crop_head"] = True
    torch.save(state, tmp_path / "model.pt")
    model = serving.BlendSignModel()
    model.load_checkpoints([tmp_path / "model.pt"], device="cpu")
    net, cfg, _ = load_trained(tmp_path / "model.pt", torch.device("cpu"))
    data = dicom_bytes("693_UNCI.dcm")
    hu = torch.from_numpy(hu_from_dataset(pydicom.dcmread(io.BytesIO(data))))
    crop = head_crop(hu, cfg.data)
    assert crop is not None and crop[2] < 512  # the head is smaller than the field of view
    with torch.no_grad():
        out = net(preprocess(hu, cfg.data)[None])
    expected = unscale_boxes(decode_boxes(out["det"][0], stride=net.stride, threshold=serving.BOX_THRESHOLD),
                             512, 512, cfg.data.size, crop).numpy()
    row = model.predict(None, pd.DataFrame({"dicom": [data]}), params={"explain": True}).iloc[0]
    assert row["error"] is None and len(row["boxes"]) == len(expected) > 0
    np.testing.assert_allclose(np.array(row["boxes"]), expected, atol=0.01)
    np.testing.assert_allclose(row["p_non_ich"], out["logits"][0].softmax(0)[0].item(), atol=1e-5)
    png = Image.open(io.BytesIO(base64.b64decode(row["gradcam_png"])))
    assert png.size == (512, 512)
