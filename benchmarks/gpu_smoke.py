"""A short real training run on a GPU: the paper's model (ResNet-50 at 512, AMP, channels_last), a teacher and
one distilled student on fold 0 of a small synthetic cohort, through the library's own ``distill()``.

    python benchmarks/gpu_smoke.py [--scans 24] [--epochs 3] [--workers 8]

Checks the CUDA path end to end (loader → AMP step → validation → soft labels → student) and prints each
epoch's images/s and losses, and the peak GPU memory. No MLflow: run it where only torch is installed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from blendsign.config import load_preset, override
from blendsign.distill import distill
from blendsign.folds import make_folds
from blendsign.ingest import ingest
from blendsign.labels import fuse
from blendsign.synth import synthesize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_smoke.py needs a CUDA device")
    os.environ.setdefault("BLENDSIGN_PSEUDONYM_KEY", "gpu-smoke-key-not-secret-0123456789")
    cfg = override(load_preset("paper"), model={"weights": "none"},
                   train={"epochs": args.epochs, "device": "cuda"}, data={"workers": args.workers})
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}; amp {cfg.train.amp}, "
          f"channels_last {cfg.train.channels_last}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        synthesize(root / "src", replace(cfg.synth, scans=args.scans), progress=False)
        ingest(root / "src" / "dicom", root / "ingest", replace(cfg.ingest, workers=args.workers), progress=False)
        fuse(root / "src" / "annotations.csv", root / "ingest", root / "labels", cfg.labels)
        make_folds(root / "labels", root / "folds", cfg.folds)
        print(f"cohort of {args.scans} scans in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        result = distill(cfg, ingest_dir=root / "ingest", labels_dir=root / "labels", folds_dir=root / "folds",
                         fold=0, out_dir=root / "out", rounds=1, progress=False)
        print(f"teacher + 1 student, {args.epochs} epochs each, in {time.perf_counter() - t0:.1f} s")
        for r, round_ in enumerate(result.rounds):
            for h in round_.history:
                print(f"round {r} epoch {h['epoch']:.0f}: images/s {h['images_per_s']:.1f}, "
                      f"loss_total {h['loss_total']:.3f}, loss_kd {h['loss_kd']:.4f}, "
                      f"val_auc_blend_sign {h['val_auc_blend_sign']:.3f}")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
