"""CPU time a loader worker spends per slice: reading only (``data.prepare_on = "device"``) against reading and
preparing (windows, resize, augmentation, targets: ``prepare_on = "workers"``), at the paper's 512×512.

    python benchmarks/bench_loader_cpu.py [--scans 8] [--size 512] [--batch-size 16]

On a GPU machine the first is what the workers must keep up with; ``Prepare`` then runs on the device. One
thread, as each worker; prints ms per slice of each and their ratio (last line).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import bench_train
import torch

from blendsign.config import load_preset, override
from blendsign.data import Prepare, SliceDataset, collate, load_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("BLENDSIGN_PSEUDONYM_KEY", "benchmark-key-not-secret-0123456789")
    torch.set_num_threads(1)
    cfg = override(load_preset("paper"), data={"size": args.size, "crop_head": True}, model={"weights": "none"})
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        ingest_dir, labels_dir = bench_train.make_cohort(cfg, Path(tmp), args.scans)
        index = load_index(ingest_dir, labels_dir)
        ds = SliceDataset(index, cfg.data, stride=32, min_overlap=cfg.loss.gaussian_min_overlap, augment=True)
        prepare, cpu = Prepare(cfg.data, 32, cfg.loss.gaussian_min_overlap), torch.device("cpu")
        keys = [(0, i) for i in range(len(ds))]
        batches = [keys[i:i + args.batch_size] for i in range(0, len(keys), args.batch_size)]
        best = {"read": float("inf"), "read+prepare": float("inf")}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            raws = [collate([ds[k] for k in b]) for b in batches]
            t1 = time.perf_counter()
            for raw in raws:
                prepare(raw, cpu)
            t2 = time.perf_counter()
            best["read"] = min(best["read"], (t1 - t0) / len(keys))
            best["read+prepare"] = min(best["read+prepare"], (t2 - t0) / len(keys))
        print(f"{len(keys)} slices at {args.size}px (head crop, augmentation), batch {args.batch_size}, 1 thread")
        for k, v in best.items():
            print(f"{k:>13}: {v * 1e3:6.2f} ms per slice")
        print(f"ratio={best['read+prepare'] / best['read']:.2f}")


if __name__ == "__main__":
    main()
