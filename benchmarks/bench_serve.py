"""Serving latency: the HTTP endpoint (``blendsign serve``) against the same model called in process.

    python benchmarks/bench_serve.py [--repeats 3] [--backbone resnet50] [--slices 40] [--batch-size 8]
                                     [--device auto|cpu|cuda] [--server blendsign|mlflow]

One 40-slice scan of real 512×512 head CT (pydicom-data's ``693_UNCI.dcm`` repeated with distinct
SOPInstanceUIDs; pydicom's ``CT_small.dcm`` upsampled to 512², its contrast tag removed, when pydicom-data is
absent) is scored by the
``paper`` model (random weights) logged to a temporary MLflow store: in process (``model_package.load(...)
.predict`` on the DICOM bytes) and over HTTP (one JSON request of base64 text to ``/invocations`` on 127.0.0.1:
``blendsign serve``, or ``mlflow models serve`` with ``--server mlflow``), both on ``--device``, the two
interleaved, after one warm-up each. Prints the device, p50/p95 latency per scan and slices/s; the last line is
``ratio=<HTTP p50 / in-process p50>``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from blendsign import model_package, serving
from blendsign.config import load_preset, override
from blendsign.model import build_model
from blendsign.model_server import model_server
from blendsign.tracking import Tracker


def scan_slices(n: int) -> list[bytes]:
    """``n`` 512×512 CT slices as DICOM bytes, distinct SOPInstanceUIDs."""
    path = get_testdata_file("693_UNCI.dcm")
    ds = pydicom.dcmread(str(path if path is not None else get_testdata_file("CT_small.dcm")))
    if int(ds.Rows) != 512:  # CT_small is 128²: upsample its stored values 4×
        ds.PixelData = np.kron(ds.pixel_array, np.ones((4, 4), dtype=ds.pixel_array.dtype)).tobytes()
        ds.Rows, ds.Columns = 512, 512
        del ds.ContrastBolusAgent  # CT_small is contrast-enhanced, which the model declines
    out = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        buffer = io.BytesIO()
        ds.save_as(buffer)
        out.append(buffer.getvalue())
    return out


def post(base: str, body: bytes) -> list[dict[str, object]]:
    req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())["predictions"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=serving.DEFAULT_BATCH_SIZE)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--server", choices=("blendsign", "mlflow"), default="blendsign")
    args = parser.parse_args()

    cfg = override(load_preset("paper"), model={"backbone": args.backbone, "weights": "none"})
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        torch.save({"format": 1, "model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()},
                   root / "model.pt")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        tracker = Tracker.open(uri=uri)
        with tracker.run("bench-serve") as run:
            run_id = run.run_id
        model_uri = model_package.log_model(run_id=run_id, tracking_uri=uri, checkpoints=[root / "model.pt"],
                                      batch_size=args.batch_size)
        slices = scan_slices(args.slices)
        frame = pd.DataFrame({"dicom": slices})
        body = json.dumps({"dataframe_split": {"columns": ["dicom"],
                                               "data": [[base64.b64encode(s).decode()] for s in slices]}}).encode()
        model = model_package.load(model_uri, tracking_uri=uri, model_config={"device": args.device})
        device = model.unwrap_python_model().device
        with model_server(model_uri, tracking_uri=uri, log=root / "serve.log", guarded=args.server == "blendsign",
                          env={"BLENDSIGN_SERVE_DEVICE": args.device}) as base:
            # The server runs predict in a worker thread (asyncio.to_thread); so does the in-process side: on a
            # busy 2-core machine torch ran ~15% faster in a worker thread than in the main thread (A/B measured).
            pool = ThreadPoolExecutor(1)
            local = pool.submit(model.predict, frame).result()  # warm-up (both sides)
            remote = post(base, body)
            assert local["error"].isna().all() and all(r["error"] is None for r in remote)
            assert np.allclose([r["p_blend_sign"] for r in remote], local["p_blend_sign"].to_numpy(float), atol=1e-5)
            times: dict[str, list[float]] = {"in-process": [], "http": []}
            calls = {"in-process": lambda: pool.submit(model.predict, frame).result(),
                     "http": lambda: post(base, body)}
            for r in range(args.repeats):
                for mode in sorted(calls, reverse=r % 2 == 1):  # alternate the order: shared-CPU drift cancels
                    t = time.perf_counter()
                    calls[mode]()
                    times[mode].append(time.perf_counter() - t)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.backbone} at {cfg.data.size}², {args.slices} slices per request, batch {args.batch_size}, "
          f"device {device} ({where}), {args.server} server, {args.repeats} repeats, request "
          f"{len(body) / 2**20:.1f} MiB")
    print(f"{'mode':<12}{'p50 s':>9}{'p95 s':>9}{'slices/s':>10}")
    for mode, ts in times.items():
        p50, p95 = np.percentile(ts, [50, 95])
        print(f"{mode:<12}{p50:>9.2f}{p95:>9.2f}{args.slices / p50:>10.1f}")
    print(f"ratio={np.median(times['http']) / np.median(times['in-process']):.3f}")


if __name__ == "__main__":
    main()
