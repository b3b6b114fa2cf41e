"""Repeated self-knowledge distillation on one fold (paper §Self-knowledge distillation, Figure 5).

Round 0 trains the teacher. In round r ≥ 1 the previous round's final model predicts soft labels
(softmax at temperature T) for every training slice with evaluation preprocessing, and a student is
trained on L_cls + λ1·L_det + λ2·KL(teacher ‖ student), from the backbone's weights as the teacher was or from
the teacher's (``distill.student_init``); the student teaches the next round.

Layout: ``OUT/fold<k>/round<r>/`` (a ``train`` output folder each), ``round<r>/soft_labels.parquet`` and
``round<r>/review.md|csv`` (slices where the teacher most disagrees with the training label: what a
radiologist would re-read), ``OUT/fold<k>/distill.json`` naming the final checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from blendsign import CLASSES
from blendsign.config import Config
from blendsign.data import SliceDataset, SliceIndex, make_loader, training_data
from blendsign.engine import predict, resolve_device, softmax
from blendsign.errors import InputError
from blendsign.folds import fold_name
from blendsign.model import load_trained
from blendsign.storage import atomic_path, file_sha256, write_json_atomic, write_text_atomic
from blendsign.tracking import Tracker
from blendsign.train import TrainResult, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillResult:
    fold: int | None
    rounds: tuple[TrainResult, ...]
    fold_run_id: str | None

    @property
    def final(self) -> TrainResult:
        return self.rounds[-1]

    def summary(self) -> str:
        steps = ", ".join(f"round {i}: {r.epochs} epochs" + (f", held-out AUC blend sign {auc:.3f}"
                          if (auc := r.held_out()) is not None else "") for i, r in enumerate(self.rounds))
        return f"fold {self.fold}: {steps}; final model {self.final.checkpoint}"


def soft_labels(checkpoint: str | Path, index: SliceIndex, cfg: Config, device: torch.device,
                *, progress: bool = True) -> np.ndarray:
    """The teacher's ``[n, 3]`` class probabilities at temperature T for ``index``.

    Preprocessed as the teacher was trained (its checkpoint's ``data`` config), without augmentation.
    """
    model, trained, _ = load_trained(checkpoint, device)
    ds = SliceDataset(index, trained.data, stride=model.stride, min_overlap=trained.loss.gaussian_min_overlap,
                      augment=False)
    loader = make_loader(ds, batch_size=cfg.train.batch_size, shuffle=False, workers=cfg.data.workers,
                         device=device)
    pred = predict(model, loader, device=device, desc="teacher", progress=progress)
    out = np.zeros((len(index), len(CLASSES)), dtype=np.float32)
    out[pred["index"]] = softmax(pred["logits"], cfg.loss.kd_temperature)
    return out


def review_table(index: SliceIndex, soft: np.ndarray, top: int) -> list[dict[str, Any]]:
    """The ``top`` training slices whose label the teacher believes least (lowest p(label))."""
    p_label = soft[np.arange(len(index)), index.label]
    order = np.argsort(p_label, kind="stable")[:top]
    return [
        {
            "scan_id": index.scan_id[i],
            "slice_index": int(index.slice_index[i]),
            "instance_key": index.instance_key[i],
            "label": CLASSES[index.label[i]],
            "teacher_says": CLASSES[int(soft[i].argmax())],
            "p_label": round(float(p_label[i]), 4),
            **{f"p_{c}": round(float(soft[i, k]), 4) for k, c in enumerate(CLASSES)},
            "noise_injected": bool(index.noisy[i]) if index.noisy is not None else False,
        }
        for i in order
    ]


SOFT_LABELS, TEACHER_FILE = "soft_labels.parquet", "teacher.json"


def _saved_soft_labels(folder: Path, checkpoint: Path, index: SliceIndex) -> np.ndarray | None:
    """A round's soft labels as written before (``[n, 3]`` float32), if its teacher is still the same checkpoint
    (by content): a resumed round is taught exactly as it started, even when the pod that resumes it predicts
    on another device (whose float16 results would differ in the last bit and make the round start over)."""
    meta, table_path = folder / TEACHER_FILE, folder / SOFT_LABELS
    if not (meta.is_file() and table_path.is_file()):
        return None
    if json.loads(meta.read_text()).get("checkpoint_sha256") != file_sha256(checkpoint):
        return None
    table = pq.read_table(table_path)
    if table.column("instance_key").to_pylist() != list(index.instance_key):
        return None
    return np.stack([table.column(f"p_{c}").to_numpy() for c in CLASSES], axis=1).astype(np.float32)


def _write_round_inputs(folder: Path, index: SliceIndex, soft: np.ndarray, review: list[dict[str, Any]],
                        teacher_checkpoint: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "scan_id": list(index.scan_id), "slice_index": index.slice_index.astype(np.int32),
        "instance_key": list(index.instance_key), "label": [CLASSES[c] for c in index.label],
        **{f"p_{c}": soft[:, k] for k, c in enumerate(CLASSES)},
    })
    with atomic_path(folder / SOFT_LABELS) as tmp:
        pq.write_table(table, tmp)
    write_json_atomic(folder / TEACHER_FILE, {"checkpoint_sha256": file_sha256(teacher_checkpoint)})
    header = list(review[0]) if review else ["scan_id"]
    csv_lines = [",".join(header)] + [",".join(str(r[h]) for h in header) for r in review]
    write_text_atomic(folder / "review.csv", "\n".join(csv_lines) + "\n")
    md = ["# Slices to re-read", "", "Training slices whose label the teacher believes least (lowest p(label)).", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in review]
    write_text_atomic(folder / "review.md", "\n".join(md) + "\n")


def distill(
    cfg: Config,
    *,
    ingest_dir: str | Path,
    labels_dir: str | Path,
    folds_dir: str | Path | None,
    fold: int | None,
    out_dir: str | Path,
    rounds: int | None = None,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[], None] | None = None,
) -> DistillResult:
    """Teacher plus ``rounds`` students on ``fold`` (``None``: all data, no validation). Idempotent.

    ``on_checkpoint``: called whenever a round's files change (each epoch, each round's soft labels, the end).
    """
    rounds = cfg.distill.rounds if rounds is None else rounds
    fold_dir = Path(out_dir) / job_dir_name(fold)
    device = resolve_device(cfg.train.device)
    name = fold_name(fold)
    state_file = fold_dir / STATE_FILE
    fold_run_id = None
    if tracker is not None:
        previous: dict[str, Any] = next(
            (json.loads(f.read_text()) for f in (state_file, fold_dir / RUN_FILE) if f.exists()), {})
        with tracker.run(name, tags={"fold": "all" if fold is None else fold, "stage": "fold", "preset": cfg.preset},
                         parent_run_id=parent_run_id, run_id=previous.get("fold_run_id")) as run:
            fold_run_id = run.run_id
        write_json_atomic(fold_dir / RUN_FILE, {"fold_run_id": fold_run_id})  # a retried pod resumes this run
    results: list[TrainResult] = []
    train_index, _, _ = training_data(cfg, ingest_dir, labels_dir, folds_dir, fold)
    for r in range(rounds + 1):
        folder = fold_dir / f"round{r}"
        teacher = None
        if r > 0:
            teacher = _saved_soft_labels(folder, results[-1].checkpoint, train_index)
            if teacher is None:
                teacher = soft_labels(results[-1].checkpoint, train_index, cfg, device, progress=progress)
                review = review_table(train_index, teacher, cfg.distill.review_top)
                _write_round_inputs(folder, train_index, teacher, review, results[-1].checkpoint)
                flipped = sum(r_["noise_injected"] for r_ in review)
                log.info("%s round %d: teacher disagrees most with %d slices (%d of them injected noise); see %s",
                         name, r, len(review), flipped, folder / "review.md")
        init = results[-1].checkpoint if r > 0 and cfg.distill.student_init == "teacher" else None
        # the model evaluated and registered, not a teacher on its way (the pipeline's teacher step: rounds=0)
        last = r == rounds and rounds >= cfg.distill.rounds
        # resume=True: a round killed half-way (a pre-empted pipeline task) continues where it stopped
        result = train(cfg, ingest_dir=ingest_dir, labels_dir=labels_dir, folds_dir=folds_dir, fold=fold,
                       out_dir=folder, resume=True, tracker=tracker, teacher=teacher, run_name=f"{name}-round{r}",
                       parent_run_id=fold_run_id, tags={"round": str(r)}, progress=progress,
                       on_checkpoint=on_checkpoint, init_from=init, fit_ood=last)
        if tracker is not None and r > 0 and result.run_id:
            for artifact in (SOFT_LABELS, "review.md", "review.csv"):
                tracker.client.log_artifact(result.run_id, str(folder / artifact), "distillation")
        results.append(result)
    write_json_atomic(state_file, {"fold": fold, "rounds": rounds, "fold_run_id": fold_run_id,
                                   "final_checkpoint": str(results[-1].checkpoint.relative_to(fold_dir)),
                                   "round_run_ids": [r.run_id for r in results]})
    if on_checkpoint is not None:
        on_checkpoint()
    return DistillResult(fold, tuple(results), fold_run_id)


STATE_FILE = "distill.json"
RUN_FILE = "mlflow_run.json"  # the fold's MLflow run, written when it is opened (the state file comes at the end)


def job_dir_name(fold: int | None) -> str:
    """The folder of a training job under a distillation output: ``fold<k>``, or ``all`` for the refit."""
    return "all" if fold is None else fold_name(fold)


def read_state(fold_dir: str | Path) -> dict[str, Any]:
    """``distill.json`` of a distilled fold (fold, rounds, MLflow run ids, the final checkpoint's path)."""
    state = Path(fold_dir) / STATE_FILE
    if not state.exists():
        raise FileNotFoundError(f"{fold_dir} holds no finished distillation ({STATE_FILE} missing)")
    return dict(json.loads(state.read_text()))


def final_checkpoint(fold_dir: str | Path) -> Path:
    """The final model of a distilled fold (its last round's ``model.pt``)."""
    return Path(fold_dir) / read_state(fold_dir)["final_checkpoint"]


def export_final(fold_dir: str | Path, dest: str | Path) -> Path:
    """Copy what later steps read of a distilled fold, ``distill.json`` and the final ``model.pt`` (no optimiser
    state, no earlier rounds), to ``dest/<fold folder>/``, the layout ``evaluate`` reads; returns that folder.
    The folder is replaced as a whole (a re-run, or the students' export after the teacher's)."""
    fold_dir = Path(fold_dir)
    target, final = Path(dest) / fold_dir.name, final_checkpoint(fold_dir)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for src in (final, fold_dir / STATE_FILE):
            (staging / src.relative_to(fold_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, staging / src.relative_to(fold_dir))
        shutil.rmtree(target, ignore_errors=True)  # an earlier export (the teacher's round) leaves nothing behind
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gather(sources: Iterable[str | Path], dest: str | Path, *, names: Sequence[str] | None = None) -> Path:
    """The distilled folds found in ``sources`` (folders holding ``fold<k>/``, ``all/``) copied into ``dest``
    (:func:`export_final`'s layout): how ``evaluate`` and ``register`` collect the training jobs' outputs.
    ``names``: exactly these folders (default every ``fold<k>``), each found once."""
    dest = Path(dest)
    found: dict[str, Path] = {}
    for folder in sources:
        for fold_dir in sorted(Path(folder).glob("fold*") if names is None else
                               (Path(folder) / n for n in names if (Path(folder) / n).is_dir())):
            if fold_dir.name in found:
                raise InputError(f"{fold_dir.name} given twice")
            found[fold_dir.name] = fold_dir
    missing = sorted(set(names or []) - set(found))
    if missing or not found:
        raise FileNotFoundError(f"no finished training job {', '.join(missing) or 'fold'} among the models collected "
                                "(a training step did not finish?)")
    for fold_dir in found.values():
        export_final(fold_dir, dest)
    return dest
