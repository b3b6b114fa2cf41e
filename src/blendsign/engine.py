"""One training epoch and batched inference: no MLflow, no argparse, device passed in."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from blendsign.config import LossConfig
from blendsign.errors import ConfigError
from blendsign.losses import total_loss
from blendsign.progress import progress as progress_bar

TARGET_KEYS = ("label", "heatmap", "reg", "reg_mask")


def resolve_device(spec: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; a CUDA request without a usable CUDA device is a clear error.

    The error says what was found (torch's CUDA build, ``torch.cuda.is_available()``, the device count) and the
    likely fix, so that a GPU task on a node whose driver is too old for the image's CUDA fails at once instead
    of training on the CPU for hours.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type != "cuda":
        return device
    available, count, cuda = torch.cuda.is_available(), torch.cuda.device_count(), torch.version.cuda
    build = f"built for CUDA {cuda}" if cuda else "a CPU-only build"
    found = f"torch {torch.__version__} is {build}, torch.cuda.is_available() is {available}, {count} CUDA device(s)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        found += f", CUDA_VISIBLE_DEVICES={visible!r}"
    if not available or count == 0:
        if cuda:
            fix = (f"the node's NVIDIA driver may be older than CUDA {cuda} needs, or no GPU is allocated to this "
                   "container; use an image built for the node's CUDA (docker/README.md), or "
                   "compile the pipeline for CPU (--gpus 0) / run with --device cpu or auto")
        else:
            fix = ("this torch cannot use a GPU: use the CUDA image (docker/README.md) or a CUDA build of torch, "
                   "or compile the pipeline for CPU (--gpus 0) / run with --device cpu or auto")
        raise ConfigError(f"device {spec!r} requested but no CUDA device is usable here ({found}); {fix}")
    if device.index is not None and device.index >= count:
        valid = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ConfigError(f"device {spec!r} requested but only {count} CUDA device(s) are visible here ({found}); "
                         f"use {valid}, cuda or auto")
    return device


SYNC_EVERY = 25  # training steps between host syncs: the non-finite check and the progress bar's loss


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device computes it (Ampere and later: no loss scaling, so no ``GradScaler`` sync per
    step), else float16 with loss scaling."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _inputs(batch: dict[str, Any], device: torch.device, channels_last: bool) -> torch.Tensor:
    images = batch["image"].to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    loss_cfg: LossConfig,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    grad_clip_norm: float = 0.0,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """Train over ``loader`` (batches of :class:`blendsign.data.Prepare`'s form) once; the LR scheduler steps
    per iteration (poly decay); gradients are clipped to ``grad_clip_norm`` (0: not clipped).

    The host waits for the device only every ``SYNC_EVERY`` steps and at the end: a non-finite loss stops the
    epoch there (before any checkpoint is written), naming the steps it fell in. Autocast uses
    :func:`amp_dtype`; ``scaler`` is enabled for float16 only.

    Returns the sample-weighted mean of each loss term (``loss_<term>``), the last ``lr`` and
    ``images_per_s``.
    """
    model.train()
    dtype = amp_dtype(device)
    sums: dict[str, torch.Tensor] = {}
    finite = torch.ones((), dtype=torch.bool, device=device)
    seen, step, checked, start = 0, 0, 0, time.perf_counter()
    bar = progress_bar(loader, desc=desc, unit="batch", enabled=progress, leave=False)
    for step, batch in enumerate(bar, start=1):
        images = _inputs(batch, device, channels_last)
        targets = {k: batch[k].to(device, non_blocking=True) for k in TARGET_KEYS}
        teacher = batch["teacher"].to(device, non_blocking=True) if "teacher" in batch else None
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = model(images)
        out = {k: v.float() for k, v in out.items()}  # losses in float32
        terms = total_loss(out, targets, loss_cfg, teacher_probs=teacher)
        finite &= torch.isfinite(terms["total"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["total"]).backward()
        if grad_clip_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = images.shape[0]
        seen += n
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach() * n
        if step % SYNC_EVERY == 0:
            _check_finite(finite, desc, checked + 1, step)
            checked = step
            if progress:
                bar.set_postfix(loss=f"{terms['total'].item():.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.1f}")
    _check_finite(finite, desc, checked + 1, step)
    elapsed = time.perf_counter() - start
    out_metrics = {f"loss_{k}": float(v) / max(seen, 1) for k, v in sums.items()}
    out_metrics["lr"] = float(optimizer.param_groups[0]["lr"])
    out_metrics["images_per_s"] = seen / elapsed if elapsed > 0 else math.nan
    return out_metrics


def _check_finite(finite: torch.Tensor, desc: str, first: int, last: int) -> None:
    if not bool(finite):
        raise FloatingPointError(f"{desc}: non-finite loss in batches {first}–{last}")


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    desc: str = "predict",
    progress: bool = True,
    stats: bool = False,
) -> dict[str, Any]:
    """Logits ``[n, 3]``, labels ``[n]`` and dataset indices ``[n]`` over ``loader`` (eval mode); with ``stats``
    also ``stats``: per trunk stage the network's ``stage_stats`` ``[n, D_l]`` (:mod:`blendsign.ood`)."""
    model.eval()
    logits, labels, index, stages = [], [], [], []
    for batch in progress_bar(loader, desc=desc, unit="batch", enabled=progress, leave=False):
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            out = model(_inputs(batch, device, channels_last), stage_stats=stats)
        logits.append(out["logits"].float().cpu())
        if stats:
            stages.append([s.float().cpu() for s in out["stage_stats"]])
        labels.append(batch["label"].cpu())
        index.append(batch["index"])
    result: dict[str, Any] = {
        "logits": torch.cat(logits).numpy() if logits else np.zeros((0, 3), np.float32),
        "labels": torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
        "index": torch.cat(index).numpy() if index else np.zeros(0, np.int64),
    }
    if stats:
        result["stats"] = [torch.cat(stage).numpy() for stage in zip(*stages, strict=True)]
    return result


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
