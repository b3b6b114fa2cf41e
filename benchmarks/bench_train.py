"""Training throughput: the real Parquet data path against the same model fed from in-memory tensors.

    python benchmarks/bench_train.py [--preset demo] [--iters 20] [--device cpu] [--prepare-on workers]

Both sides run the same training step (forward, all loss terms, backward, SGD) on the same batches:
the data path reads row groups from the ingested Parquet files in its persistent worker pool, and windows,
resizes, augments and renders targets (``data.Prepare``) where ``--prepare-on`` says (``auto``: on a CUDA
device, else in the workers); the in-memory side loops over those batches made beforehand, already on the
device. Images/s of each and their ratio are printed; the last line is ``ratio=<data path / in-memory>``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from blendsign.config import Config, load_preset, override
from blendsign.data import SliceDataset, load_index, make_loader
from blendsign.engine import amp_dtype, resolve_device
from blendsign.folds import make_folds
from blendsign.ingest import ingest
from blendsign.labels import fuse
from blendsign.losses import total_loss
from blendsign.model import build_model
from blendsign.synth import synthesize

KEYS = ("label", "heatmap", "reg", "reg_mask")


def make_cohort(cfg: Config, root: Path, scans: int) -> tuple[Path, Path]:
    synthesize(root / "src", replace(cfg.synth, scans=scans, size=cfg.data.size), progress=False)
    ingest(root / "src" / "dicom", root / "ingest", replace(cfg.ingest, workers=2), progress=False)
    fuse(root / "src" / "annotations.csv", root / "ingest", root / "labels", cfg.labels)
    make_folds(root / "labels", root / "folds", cfg.folds)
    return root / "ingest", root / "labels"


def step_fn(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    cuda = device.type == "cuda"
    if cuda and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda and cfg.train.amp and dtype == torch.float16)

    net = torch.compile(model) if cfg.train.torch_compile else model

    def step(batch: dict[str, Any]) -> int:
        images = batch["image"].to(device, non_blocking=True)
        if cuda and cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {k: batch[k].to(device, non_blocking=True) for k in KEYS}
        with torch.autocast(device.type, dtype=dtype, enabled=cuda and cfg.train.amp):
            out = net(images)
        loss = total_loss({k: v.float() for k, v in out.items()}, targets, cfg.loss)["total"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return images.shape[0]

    return model, step


def timed(step: Any, batches: Any, iters: int, warmup: int, device: torch.device) -> float:
    """Images/s over ``iters`` steps after ``warmup`` steps."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for _ in range(iters):
        n += step(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def cycle(loader: Any) -> Any:
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scans", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--prepare-on", default=None, choices=("auto", "device", "workers"))
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (train.torch_compile)")
    args = ap.parse_args()
    os.environ.setdefault("BLENDSIGN_PSEUDONYM_KEY", "benchmark-key-not-secret-0123456789")
    cfg = load_preset(args.preset)
    cfg = override(cfg, model={"weights": "none", **({"backbone": args.backbone} if args.backbone else {})},
                   data={k: v for k, v in {"size": args.size, "workers": args.workers,
                                           "prepare_on": args.prepare_on}.items() if v is not None},
                   train={**({"batch_size": args.batch_size} if args.batch_size else {}),
                          **({"torch_compile": True} if args.compile else {})})
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        t0 = time.perf_counter()
        ingest_dir, labels_dir = make_cohort(cfg, Path(tmp), args.scans)
        index = load_index(ingest_dir, labels_dir)
        model, step = step_fn(cfg, device)
        ds = SliceDataset(index, cfg.data, stride=model.stride, min_overlap=cfg.loss.gaussian_min_overlap,
                          augment=True)
        loader = make_loader(ds, batch_size=cfg.train.batch_size, shuffle=True, workers=cfg.data.workers,
                             device=device)
        n_batches = args.iters + args.warmup
        where = "in the workers" if loader.prepared_in_workers else f"on {device}"
        print(f"{cfg.model.backbone} at {cfg.data.size}px, batch {cfg.train.batch_size}, {cfg.data.workers} "
              f"loader workers, {device}, prepared {where}; {len(index)} slices (cohort made in "
              f"{time.perf_counter() - t0:.0f} s)")
        # the same batches, in memory on the device
        memory = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                  for b, _ in zip(cycle(loader), range(n_batches), strict=False)]
        rates = {"in-memory": [], "parquet": []}
        for _ in range(2):  # alternate to even out drift; best of two
            rates["in-memory"].append(timed(step, memory, args.iters, args.warmup, device))
            rates["parquet"].append(timed(step, cycle(loader), args.iters, args.warmup, device))
        best = {k: max(v) for k, v in rates.items()}
        for k, v in best.items():
            print(f"{k:>10}: {v:8.1f} images/s")
        print(f"ratio={best['parquet'] / best['in-memory']:.3f}")


if __name__ == "__main__":
    main()
