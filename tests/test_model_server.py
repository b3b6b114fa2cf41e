"""The model over HTTP: ``mlflow models serve`` and ``blendsign serve`` (limits, errors without request content,
/health), on 127.0.0.1 with real head-CT DICOM."""

from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from blendsign import CLASSES, serving
from blendsign.model_server import ServerSettings, error_message, model_server
from tests.conftest import IDENTIFIERS, write_ct
from tests.served import GOOD, b64, dicom_bytes


def _request(url: str, body: bytes | None = None, timeout: float = 60.0,
             content_type: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def server(served: dict[str, Any], tmp_path: Path) -> Any:
    """``mlflow models serve --env-manager local`` on 127.0.0.1 (``model_server``)."""
    with model_server(served["model_uri"], tracking_uri=served["uri"], log=tmp_path / "serve.log") as base:
        yield base


def test_model_server_reports_a_server_that_does_not_start(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(RuntimeError, match="model server exited"), \
            model_server("models:/no-such-model/1", tracking_uri=uri, log=tmp_path / "serve.log"):
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


# --- blendsign serve: MLflow's scoring app behind the guard ------------------------------------------------


@pytest.fixture(scope="module")
def guarded(served: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``blendsign serve`` on 127.0.0.1 with small limits: 3 slices, 2 MiB per request."""
    log = tmp_path_factory.mktemp("guarded") / "serve.log"
    with model_server(served["model_uri"], tracking_uri=served["uri"], log=log, guarded=True,
                      env={"BLENDSIGN_MAX_ROWS": "3", "BLENDSIGN_MAX_REQUEST_BYTES": str(2 << 20),
                           "BLENDSIGN_SERVE_DEVICE": "cpu"}) as base:
        yield base, log


def canary_dicom(tmp_path: Path) -> tuple[bytes, list[str]]:
    """A real CT file carrying identifying canaries (name, ID, accession number, institution, birth date)."""
    path = tmp_path / "canary.dcm"
    write_ct(path, np.full((64, 64), 40, dtype=np.int16), study="1.2.826.0.1.3680043.8.498.1",
             series="1.2.826.0.1.3680043.8.498.2", patient_id="CANARY-PID-4711")
    secrets = [*IDENTIFIERS.values(), *IDENTIFIERS["PatientName"].split("^"), "CANARY-PID-4711"]
    return path.read_bytes(), secrets


def test_guarded_server_scores_like_mlflows_and_reports_its_health(guarded: Any, model: Any) -> None:
    base, _ = guarded
    status, body = _invoke(base, [b64(dicom_bytes(n)) for n in GOOD])
    assert status == 200, body
    local = model.predict(pd.DataFrame({"dicom": [dicom_bytes(n) for n in GOOD]}))
    for i, row in enumerate(body["predictions"]):
        np.testing.assert_allclose([row[c] for c in serving.PROB_COLUMNS],
                                   local.loc[i, list(serving.PROB_COLUMNS)].to_numpy(dtype=float), atol=1e-5)
    status, raw = _request(f"{base}/health")
    health = json.loads(raw)
    assert status == 200 and health["status"] == "ready" and health["device"] == "cpu"
    assert health["max_rows"] == 3 and health["max_bytes"] == 2 << 20 and health["model"]["folds"] == 1


def _raw_post(base: str, body: bytes, *, chunked: bool) -> tuple[int, bytes]:
    """POST over a plain socket, reading the answer even when the server stops reading the body (413)."""
    host, port = base.removeprefix("http://").split(":")
    framing = b"Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}".encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing
                     + b"\r\n\r\n")
        try:
            if chunked:
                for i in range(0, len(body), 1 << 16):
                    part = body[i : i + (1 << 16)]
                    sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: read what it said
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def test_errors_never_repeat_the_request(guarded: Any, tmp_path: Path) -> None:
    """A raw DICOM posted as JSON or CSV, a request over the limits, a wrong column: short answers without a byte
    of what was sent, and the server keeps answering."""
    base, log = guarded
    data, secrets = canary_dicom(tmp_path)
    cases = [
        (data, "application/json", 400, "the request cannot be scored"),
        (data, "text/csv", 400, "the request cannot be scored"),
        (data, "application/x-dicom", 415, "unsupported content type"),
        (json.dumps({"dataframe_split": {"columns": ["dicom"], "data": [[b64(data)]] * 4}}).encode(),
         "application/json", 400, "4 slices in one request: at most 3"),
        (json.dumps({"dataframe_split": {"columns": ["name"], "data": [[IDENTIFIERS["PatientName"]]]}}).encode(),
         "application/json", 400, "the request cannot be scored"),
    ]
    for body, content_type, status, message in cases:
        got, raw = _request(f"{base}/invocations", body, content_type=content_type)
        text = raw.decode("latin-1")
        assert got == status, (content_type, status, text[:300])
        answer = json.loads(raw)
        assert set(answer) == {"error_code", "message"} and message in answer["message"], answer
        assert len(raw) < 1024 and not [s for s in secrets if s in text], text[:300]
    big = json.dumps({"dataframe_split": {"columns": ["dicom"], "data": [[b64(data)]] * 200}}).encode()
    assert len(big) > 2 << 20
    for chunked in (False, True):  # refused from the declared length at once; counted while reading a chunked one
        got, raw = _raw_post(base, big, chunked=chunked)
        assert got == 413 and b"request body over 2097152 bytes" in raw and not [s for s in secrets if s.encode()
                                                                                 in raw], raw[:300]
    status, body = _invoke(base, [b64(data)])  # the canary itself scores: it is a CT slice
    assert status == 200 and body["predictions"][0]["error"] is None
    logged = log.read_text(errors="replace")
    assert "request refused: HTTP 413" in logged and not [s for s in secrets if s in logged]


def test_error_messages_are_fixed_texts_or_the_models_own() -> None:
    settings = ServerSettings(max_bytes=100, timeout=7)
    assert "over 100 bytes" in error_message(413, settings, [])
    assert "longer than 7 s" in error_message(504, settings, [])
    assert error_message(400, settings, ["5 slices in one request: at most 3"]) == "5 slices in one request: at most 3"
    assert error_message(500, settings, []).endswith("the server's log has the reason")
    with pytest.raises(ValueError, match="BLENDSIGN_REQUEST_TIMEOUT must be an integer"):
        ServerSettings.from_env({"BLENDSIGN_REQUEST_TIMEOUT": "soon"})
