"""Train one model on one cross-validation fold (or on all data): checkpoints, resume, MLflow.

Paper §Training details: SGD (momentum 0.9, weight decay 5e-4), base LR 0.01 with poly decay (power 0.9)
per iteration, batch 16, 50 epochs. The same entry point runs under ``torchrun`` with
DistributedDataParallel (``batch_size`` is the global batch, split over the processes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from blendsign import checkpoint
from blendsign.checkpoint import LAST, MODEL
from blendsign.config import Config
from blendsign.data import SliceDataset, SliceIndex, check_data, make_loader, training_data
from blendsign.engine import amp_dtype, predict, resolve_device, softmax, train_one_epoch
from blendsign.errors import ConfigError, InputError
from blendsign.folds import fold_name
from blendsign.metrics import per_class_metrics
from blendsign.model import build_model, load_trained
from blendsign.storage import file_sha256, remove_stale_temporaries, write_json_atomic
from blendsign.tracking import Tracker, finite

log = logging.getLogger(__name__)
CONFIG_FILE, HISTORY_FILE = "config.json", "history.json"  # beside the checkpoints: the run's config, its metrics


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    fold: int | None
    epochs: int
    run_id: str | None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path:
        """The trained model: the final epoch's weights (paper §Training details: 50 epochs; none is chosen)."""
        return self.out_dir / MODEL

    def held_out(self, metric: str = "auc_blend_sign") -> float | None:
        """The final epoch's ``metric`` on the held-out fold (None for a refit on all data)."""
        value = self.history[-1].get(f"val_{metric}") if self.history else None
        return None if value is None else float(value)

    def summary(self) -> str:
        where = "all data" if self.fold is None else f"fold {self.fold}"
        auc = self.held_out()
        return (f"trained on {where}: {self.epochs} epochs" + (f", held-out AUC blend sign {auc:.4f}" if auc is not None
                else "") + f"; model {self.checkpoint}" + (f"; MLflow run {self.run_id}" if self.run_id else ""))


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _poly(total_iters: int, power: float) -> Any:
    return lambda it: max(0.0, 1.0 - it / max(1, total_iters)) ** power


def train(
    cfg: Config,
    *,
    ingest_dir: str | Path,
    labels_dir: str | Path,
    folds_dir: str | Path | None,
    fold: int | None,
    out_dir: str | Path,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    tracker: Tracker | None = None,
    teacher: np.ndarray | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[], None] | None = None,
    init_from: str | Path | None = None,
    fit_ood: bool = True,
) -> TrainResult:
    """Train on every fold but ``fold`` and validate on ``fold`` (``fold=None``: train on all, no validation).

    Writes ``out_dir/last.pt`` (with optimiser state, to resume) every epoch and ``model.pt`` (the final
    epoch's weights) at the end, plus ``config.json`` and ``history.json``. The held-out fold is scored every
    epoch for the learning curves only: choosing an epoch on it would bias the cross-validation estimate.
    Re-running a finished run returns it; an unfinished one continues with ``resume=True``. ``teacher``:
    ``[n_train, 3]`` soft labels for self-knowledge distillation. ``on_checkpoint`` is called after each epoch's
    files are written (the Kubeflow steps copy them to the run's work prefix, so a retried pod resumes there).
    ``init_from``: a checkpoint whose weights the model starts from instead of ``cfg.model.weights`` (a student
    starting from its teacher, ``distill.student_init = "teacher"``); its content is part of what the model was
    trained on. ``fit_ood``: fit the out-of-distribution statistics of ``model.pt`` (:mod:`blendsign.ood`); a
    distillation asks for them only in its last round, the model that is evaluated and registered (a finished
    run without them gets them when asked).
    """
    out_dir = Path(out_dir)
    rank, world, local_rank = _distributed()
    device = resolve_device(cfg.train.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.train.batch_size % world:
        raise ConfigError(f"batch_size {cfg.train.batch_size} does not split over {world} processes")
    cuda = device.type == "cuda"

    if rank == 0 and (removed := remove_stale_temporaries(out_dir)):
        log.info("%s: removed %d temporaries a killed run left (.last.pt.<pid>.tmp, …)", out_dir, removed)
    train_index, val_index, data_digest = training_data(cfg, ingest_dir, labels_dir, folds_dir, fold)
    source = {"data": data_digest, "teacher": teacher_digest(teacher)}
    if init_from is not None:
        source["init"] = file_sha256(init_from)
    state = _load_existing(out_dir, cfg, resume, source)
    if state is not None and state["epoch"] >= cfg.train.epochs:
        if fit_ood and rank == 0 and checkpoint.ood_state(out_dir / MODEL) is None:  # a teacher, now the last round
            model, _, _ = load_trained(out_dir / MODEL, device)
            final = checkpoint.model_only(state)
            final["ood"] = _fit_ood(model, train_index, cfg, device, model.stride, progress)
            checkpoint.save(final, out_dir / MODEL)
            if on_checkpoint is not None:
                on_checkpoint()
        else:
            log.info("%s already holds a finished run with this config: nothing to do", out_dir)
        return TrainResult(out_dir, fold, state["epoch"], state["run_id"], state["history"])

    check_data(train_index, val_index, fold)

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    # a student from its teacher: build_model loads that whole checkpoint (strict), not cfg.model.weights first
    model = build_model(replace(cfg.model, weights=str(init_from)) if init_from is not None else cfg.model).to(device)
    if cuda and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stride = model.stride
    train_ds = SliceDataset(train_index, cfg.data, stride=stride, min_overlap=cfg.loss.gaussian_min_overlap,
                            augment=True, seed=cfg.train.seed, teacher=teacher)
    train_loader = make_loader(train_ds, batch_size=cfg.train.batch_size // world, shuffle=True,
                               workers=cfg.data.workers, device=device, seed=cfg.train.seed, rank=rank,
                               world=world)
    val_loader = None
    if val_index is not None:
        val_ds = SliceDataset(val_index, cfg.data, stride=stride, min_overlap=cfg.loss.gaussian_min_overlap,
                              augment=False)
        val_loader = make_loader(val_ds, batch_size=cfg.train.batch_size, shuffle=False,
                                 workers=cfg.data.workers, device=device)

    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _poly(cfg.train.epochs * len(train_loader), cfg.train.poly_power))
    amp = cfg.train.amp and cuda
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)
    start_epoch, history, run_id = 0, [], None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and amp:  # a run may resume on another kind of device
            scaler.load_state_dict(state["scaler"])
        start_epoch, history, run_id = state["epoch"], state["history"], state["run_id"]
        log.info("resuming %s at epoch %d of %d", out_dir, start_epoch + 1, cfg.train.epochs)
    net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    if cfg.train.torch_compile:
        net = torch.compile(net)  # type: ignore[assignment]  # an OptimizedModule is called like the module

    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / CONFIG_FILE, cfg.to_dict())
    name = run_name or f"{fold_name(fold)}-{cfg.model.backbone}"
    run_tags = {"fold": "all" if fold is None else fold, "backbone": cfg.model.backbone, "preset": cfg.preset,
                "stage": "distill" if teacher is not None else "train", **(tags or {})}
    tracking = tracker if is_main else None
    with tracking.run(name, tags=run_tags, parent_run_id=parent_run_id, run_id=run_id) if tracking is not None \
            else nullcontext() as run:
        if run is not None and run_id is None:
            run.log_params({**cfg.flat(), "fold": "all" if fold is None else fold,
                            "train_slices": len(train_index), "val_slices": len(val_index or []),
                            "world_size": world, "device": device.type})
        run_id = run.run_id if run is not None else run_id
        last_epoch = cfg.train.epochs if stop_after_epochs is None else min(cfg.train.epochs,
                                                                           start_epoch + stop_after_epochs)
        for epoch in range(start_epoch, last_epoch):
            train_loader.sampler.set_epoch(epoch)
            metrics = train_one_epoch(net, train_loader, optimizer, scheduler, scaler, loss_cfg=cfg.loss,
                                      device=device, amp=amp, channels_last=cuda and cfg.train.channels_last,
                                      grad_clip_norm=cfg.train.grad_clip_norm,
                                      desc=f"{name} epoch {epoch + 1}/{cfg.train.epochs}",
                                      progress=progress and is_main)
            if val_loader is not None and is_main:
                pred = predict(model, val_loader, device=device, amp=amp, progress=False)
                metrics.update({f"val_{k}": v for k, v in
                                per_class_metrics(softmax(pred["logits"]), pred["labels"]).items()})
            metrics["epoch"] = epoch + 1
            history.append(metrics)
            if is_main:
                ckpt = {"format": checkpoint.FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                        "history": history, "config": cfg.to_dict(), "run_id": run_id, "fold": fold,
                        "trained_on": source}
                if epoch + 1 == cfg.train.epochs:  # before last.pt says "finished"
                    ood_state = _fit_ood(model, train_index, cfg, device, stride, progress) if fit_ood else None
                    checkpoint.save({**checkpoint.model_only(ckpt), "ood": ood_state}, out_dir / MODEL)
                checkpoint.save(ckpt, out_dir / LAST)
                write_json_atomic(out_dir / HISTORY_FILE, history)
                if on_checkpoint is not None:
                    on_checkpoint()
                log.info("%s epoch %d/%d: %s", name, epoch + 1, cfg.train.epochs, _brief(metrics))
                if run is not None:
                    run.log_metrics(finite(metrics), step=epoch + 1)
            if world > 1:
                dist.barrier()
        if run is not None and last_epoch == cfg.train.epochs:
            run.log_artifact(out_dir / MODEL, "checkpoint")
            run.log_artifact(out_dir / CONFIG_FILE)
            run.log_artifact(out_dir / HISTORY_FILE)
    return TrainResult(out_dir, fold, len(history), run_id, history)


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD with momentum (paper §Training details), or AdamW (``train.optimizer = "adamw"``, betas (momentum,
    0.999)), both with ``train.lr`` and ``train.weight_decay``."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.momentum, 0.999), weight_decay=t.weight_decay)
    raise ConfigError(f"train.optimizer must be 'sgd' or 'adamw', got {t.optimizer!r}")


def _fit_ood(model: torch.nn.Module, index: SliceIndex, cfg: Config, device: torch.device, stride: int,
             progress: bool) -> dict[str, Any]:
    """The final model's out-of-distribution state (:func:`blendsign.ood.fit`) from its training slices under
    evaluation preprocessing."""
    from blendsign import ood

    ds = SliceDataset(index, cfg.data, stride=stride, min_overlap=cfg.loss.gaussian_min_overlap, augment=False)
    pred = predict(model, make_loader(ds, batch_size=cfg.train.batch_size, shuffle=False, workers=cfg.data.workers,
                                        device=device),
                   device=device, desc="out-of-distribution statistics", progress=progress, stats=True)
    groups = np.asarray(index.scan_id)[pred["index"]]
    state = ood.fit(pred["stats"], pred["labels"], groups)
    log.info("out-of-distribution thresholds %s per stage (together the %g quantile of held-out training slices)",
             ", ".join(f"{stage['threshold']:.3g}" for stage in state["stages"]), state["quantile"])
    return state


def _brief(m: dict[str, float]) -> str:
    keys = ["loss_total", "lr", "images_per_s", "val_auc_blend_sign"]
    return ", ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


TRAINING_SECTIONS = ("data", "model", "loss", "train")  # what a trained model depends on ...
RUNTIME_ONLY = {"data": ("workers",), "train": ("device", "amp", "channels_last")}  # ... but not how it ran


def _training_part(config: dict[str, Any]) -> str:
    """The fields that make the model, as JSON; fields added since a checkpoint was written read as their defaults."""
    config = Config.from_dict(config).to_dict()
    part = {k: dict(config.get(k) or {}) for k in TRAINING_SECTIONS}
    for section, keys in RUNTIME_ONLY.items():
        for key in keys:
            part[section].pop(key, None)
    return json.dumps(part, sort_keys=True, default=list)


def teacher_digest(teacher: np.ndarray | None) -> str | None:
    """Identifies a round's soft labels, so a round taught by an earlier, since retrained teacher is redone."""
    return None if teacher is None else hashlib.sha256(np.ascontiguousarray(teacher, "<f4").tobytes()).hexdigest()


def _load_existing(out_dir: Path, cfg: Config, resume: bool, source: dict[str, str | None]) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None to start fresh; refuses to mix configs."""
    last = out_dir / LAST
    if not last.exists():
        if resume:
            log.debug("resume: no checkpoint in %s yet, starting fresh", out_dir)
        return None
    state = checkpoint.load(last)
    if _training_part(state.get("config", {})) != _training_part(cfg.to_dict()):
        raise InputError(f"{out_dir} holds a run with a different configuration; choose another output folder")
    if state.get("trained_on") != source:
        what = "other soft labels (its teacher was retrained since)" if (state.get("trained_on") or {}).get(
            "data") == source["data"] else "other data, labels or folds"
        log.warning("%s holds a model trained on %s: training it anew", out_dir, what)
        (out_dir / MODEL).unlink(missing_ok=True)
        return None
    if state["epoch"] < cfg.train.epochs and not resume:
        raise InputError(f"{out_dir} holds an unfinished run (epoch {state['epoch']} of {cfg.train.epochs}); "
                         "pass --resume to continue it")
    if state["epoch"] >= cfg.train.epochs and not (out_dir / MODEL).exists():  # a copy that lost it
        log.warning("%s: finished, but model.pt is missing: written again from last.pt", out_dir)
        checkpoint.save(checkpoint.model_only(state), out_dir / MODEL)
    return state
