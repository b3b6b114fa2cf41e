"""Evaluation-mode inference of the ``paper`` model (ResNet-50, 512×512): slices/s and per-scan latency.

    python benchmarks/bench_inference.py [--slices 40] [--batch 8] [--device auto] [--backbone resnet50]

One scan of ``--slices`` synthetic 512×512 slices goes through the shared preprocessing and the network,
without and with Grad-CAM (one backward pass per slice batch). Random weights: speed does not depend on
them. The last line is ``gradcam_overhead=<latency with Grad-CAM / latency without>``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from blendsign.config import Config, load_preset, override
from blendsign.engine import resolve_device
from blendsign.explain import grad_cam
from blendsign.ingest import decode_hu, ingest
from blendsign.model import build_model
from blendsign.synth import synthesize
from blendsign.transforms import preprocess


def scan_slices(n: int, size: int) -> list[np.ndarray]:
    """``n`` HU slices ``[size, size]`` int16 of synthetic scans, through the real ingest."""
    os.environ.setdefault("BLENDSIGN_PSEUDONYM_KEY", "benchmark-key-not-secret-0123456789")
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        cfg = load_preset("paper")
        synthesize(Path(tmp) / "src", replace(cfg.synth, scans=max(1, n // 8), size=size), progress=False)
        ingest(Path(tmp) / "src" / "dicom", Path(tmp) / "ingest", cfg.ingest, progress=False)
        rows = pq.read_table(Path(tmp) / "ingest" / "slices", columns=["hu", "rows", "cols"]).to_pylist()
    hu = [decode_hu(r["hu"], r["rows"], r["cols"]) for r in rows]
    return [hu[i % len(hu)] for i in range(n)]


def run_scan(model: torch.nn.Module, slices: list[np.ndarray], cfg: Config, device: torch.device, batch: int,
             explain: bool) -> float:
    """Seconds for one scan: preprocessing, forward (and Grad-CAM) in batches."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(slices), batch):
        x = torch.stack([preprocess(torch.from_numpy(s.copy()), cfg.data) for s in slices[i : i + batch]]).to(device)
        with torch.no_grad():
            probs = model(x)["logits"].softmax(1)
        if explain:
            grad_cam(model, x, target_class=None)
        probs.cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    cfg = override(load_preset("paper"), model={"backbone": args.backbone, "weights": "none"},
                   data={"size": args.size})
    device = resolve_device(args.device)
    slices = scan_slices(args.slices, args.size)
    model = build_model(cfg.model).to(device).eval()
    run_scan(model, slices[: args.batch], cfg, device, args.batch, explain=True)  # warm-up
    plain = min(run_scan(model, slices, cfg, device, args.batch, explain=False) for _ in range(args.repeats))
    cam = min(run_scan(model, slices, cfg, device, args.batch, explain=True) for _ in range(args.repeats))
    print(f"{args.backbone} at {args.size}px on {device} ({torch.get_num_threads()} threads), "
          f"scan of {args.slices} slices, batch {args.batch}")
    print(f"{'':16}{'scan latency s':>16}{'slices/s':>10}")
    print(f"{'inference':16}{plain:16.2f}{args.slices / plain:10.2f}")
    print(f"{'+ Grad-CAM':16}{cam:16.2f}{args.slices / cam:10.2f}")
    print(f"gradcam_overhead={cam / plain:.2f}")


if __name__ == "__main__":
    main()
