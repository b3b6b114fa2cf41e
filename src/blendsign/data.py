"""A torch ``Dataset`` over the ingested Parquet slices joined with fused labels and folds.

Only what a slice needs is read: the index comes from ``labels.parquet``, ``folds.parquet`` and the
``instance_key`` column of each scan file; a sample reads one row group's ``hu`` column. Randomness is a
pure function of (seed, epoch, index), so augmentations do not depend on worker count or on a resume.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from blendsign import CLASSES
from blendsign.config import Config, DataConfig
from blendsign.errors import ConfigError, InputError
from blendsign.folds import FOLDS_FILE
from blendsign.ingest import check_format, data_fingerprint, decode_hu, scan_file
from blendsign.labels import LABELS_FILE
from blendsign.targets import encode_targets_batch
from blendsign.transforms import (
    AIR_HU,
    IDENTITY,
    augment_boxes,
    augment_images,
    draw_affine,
    head_crop,
    preprocess,
    scale_boxes,
)

CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}


@dataclass(frozen=True)
class SliceIndex:
    """Where each slice lives and what it is: columns of equal length ``n``."""

    file: tuple[str, ...]  # scan Parquet file
    row_group: np.ndarray  # [n] int
    offset: np.ndarray  # [n] row within the row group
    label: np.ndarray  # [n] int64 class index
    boxes: tuple[np.ndarray, ...]  # [K, 4] x_min, y_min, x_max, y_max in native pixels
    rows: np.ndarray  # [n] native size
    cols: np.ndarray
    scan_id: tuple[str, ...]
    slice_index: np.ndarray
    instance_key: tuple[str, ...]
    fold: np.ndarray  # [n] (−1 without folds)
    noisy: np.ndarray | None = None  # [n] bool: label flipped by injected noise (ablation), else None

    def __len__(self) -> int:
        return len(self.file)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.label, minlength=len(CLASSES))


def load_index(
    ingest_dir: str | Path,
    labels_dir: str | Path,
    folds_dir: str | Path | None = None,
    *,
    folds: Collection[int] | None = None,
) -> SliceIndex:
    """Index the labelled slices of the given folds (all folds when ``folds`` is None)."""
    ingest_dir, labels_dir = Path(ingest_dir), Path(labels_dir)
    check_format(ingest_dir)
    labels = pq.read_table(labels_dir / LABELS_FILE).to_pylist()
    fold_of: dict[str, int] = {}
    if folds_dir is not None:
        for row in pq.read_table(Path(folds_dir) / FOLDS_FILE, columns=["scan_id", "fold"]).to_pylist():
            fold_of[row["scan_id"]] = int(row["fold"])
        if folds is not None:
            labels = [r for r in labels if fold_of.get(r["scan_id"]) in set(folds)]
    locate: dict[str, dict[str, tuple[int, int]]] = {}
    cols: dict[str, list[Any]] = {k: [] for k in SliceIndex.__dataclass_fields__}
    for r in labels:
        scan = r["scan_id"]
        if scan not in locate:
            locate[scan] = _locate_rows(scan_file(ingest_dir, scan))
        where = locate[scan].get(r["instance_key"])
        if where is None:
            raise InputError(f"labels refer to slice {r['instance_key']} of scan {scan}, absent from {ingest_dir}")
        boxes = np.array([[b["x_min"], b["y_min"], b["x_max"], b["y_max"]] for b in r["boxes"] or []],
                         dtype=np.float32).reshape(-1, 4)
        for key, value in (
            ("file", str(scan_file(ingest_dir, scan))),
            ("row_group", where[0]),
            ("offset", where[1]),
            ("label", CLASS_INDEX[r["label"]]),
            ("boxes", boxes),
            ("rows", r["rows"]),
            ("cols", r["cols"]),
            ("scan_id", scan),
            ("slice_index", r["slice_index"]),
            ("instance_key", r["instance_key"]),
            ("fold", fold_of.get(scan, -1)),
        ):
            cols[key].append(value)
    return SliceIndex(
        file=tuple(cols["file"]),
        row_group=np.asarray(cols["row_group"], dtype=np.int64),
        offset=np.asarray(cols["offset"], dtype=np.int64),
        label=np.asarray(cols["label"], dtype=np.int64),
        boxes=tuple(cols["boxes"]),
        rows=np.asarray(cols["rows"], dtype=np.int64),
        cols=np.asarray(cols["cols"], dtype=np.int64),
        scan_id=tuple(cols["scan_id"]),
        slice_index=np.asarray(cols["slice_index"], dtype=np.int64),
        instance_key=tuple(cols["instance_key"]),
        fold=np.asarray(cols["fold"], dtype=np.int64),
    )


def _locate_rows(path: Path) -> dict[str, tuple[int, int]]:
    """``instance_key → (row group, row within it)`` from the metadata and one small column."""
    if not path.is_file():
        raise FileNotFoundError(f"scan file {path} is missing: was the ingest folder moved or re-run elsewhere?")
    pf = pq.ParquetFile(path)
    keys = pf.read(columns=["instance_key"]).column(0).to_pylist()
    out, start = {}, 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        for j in range(n):
            out[keys[start + j]] = (rg, j)
        start += n
    return out


@functools.lru_cache(maxsize=64)
def _parquet(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(path)  # one open handle per file per process


def read_slice_hu(path: str, row_group: int, offset: int, rows: int, cols: int) -> np.ndarray:
    """One slice's HU ``[rows, cols]`` int16, reading a single row group's ``hu`` column."""
    col = _parquet(path).read_row_group(row_group, columns=["hu"]).column(0)
    return decode_hu(col[offset].as_buffer(), rows, cols)


class SliceDataset(Dataset):
    """Raw samples, what a loader worker makes: ``{"hu" [rows, cols] int16, "crop" [3] int64 (the head's square,
    :func:`blendsign.transforms.head_crop`; side 0: none), "affine" [5] float32 (the augmentation's parameters,
    :func:`blendsign.transforms.draw_affine`; identity without augmentation), "boxes" [K, 4] in input pixels
    (scaled, cropped and augmented), "label", "index", ("teacher" [3])}``; keys are ``(epoch, i)`` from
    ``EpochSampler`` or a plain ``i``. :class:`Prepare` turns a batch of them into model inputs and targets.

    Args:
        index: the slices.
        cfg: preprocessing (the same for training, evaluation and serving).
        stride: input pixels per detection-map cell of the model.
        min_overlap: CenterNet Gaussian radius parameter.
        augment: apply the paper's random augmentations.
        seed: makes augmentation a pure function of (seed, epoch, i).
        teacher: ``[n, 3]`` soft labels for distillation, or None.
    """

    def __init__(
        self,
        index: SliceIndex,
        cfg: DataConfig,
        *,
        stride: int,
        min_overlap: float,
        augment: bool,
        seed: int = 0,
        teacher: np.ndarray | None = None,
    ) -> None:
        if teacher is not None and teacher.shape != (len(index), len(CLASSES)):
            raise InputError(f"teacher soft labels of shape {teacher.shape}, expected {(len(index), len(CLASSES))}")
        self.index, self.cfg, self.stride, self.min_overlap = index, cfg, stride, min_overlap
        self.augment = augment and cfg.augment
        self.seed, self.teacher = seed, teacher

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        ix, size = self.index, self.cfg.size
        rows, cols = int(ix.rows[i]), int(ix.cols[i])
        hu = torch.from_numpy(read_slice_hu(ix.file[i], int(ix.row_group[i]), int(ix.offset[i]), rows, cols).copy())
        crop = head_crop(hu, self.cfg)
        boxes = scale_boxes(torch.from_numpy(ix.boxes[i]), rows, cols, size, crop)
        if self.augment:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 100_003 + i) % (2**63))
            affine = draw_affine(self.cfg, size, g)
            boxes = augment_boxes([boxes], affine[None], size)[0]
        else:
            affine = torch.tensor(IDENTITY, dtype=torch.float32)
        sample = {"hu": hu, "crop": torch.tensor(crop or (0, 0, 0)), "affine": affine, "boxes": boxes,
                  "label": int(ix.label[i]), "index": i}
        if self.teacher is not None:
            sample["teacher"] = torch.from_numpy(self.teacher[i].astype(np.float32))
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; ``hu`` slices of differing sizes are padded with air into ``[B, rows_max, cols_max]``
    (their sizes in ``shape`` ``[B, 2]``); the variable-length ``boxes`` stay a list."""
    out: dict[str, Any] = {"boxes": [s["boxes"] for s in samples]}
    hu = [s["hu"] for s in samples]
    out["shape"] = torch.tensor([tuple(h.shape) for h in hu])
    rows, cols = out["shape"].max(dim=0).values.tolist()
    out["hu"] = torch.full((len(hu), rows, cols), AIR_HU, dtype=hu[0].dtype)
    for b, h in enumerate(hu):
        out["hu"][b, : h.shape[0], : h.shape[1]] = h
    for key in samples[0]:
        if key in out:
            continue
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], Tensor) else torch.tensor(values)
    return out


@dataclass(frozen=True)
class Prepare:
    """A collated batch of raw samples → the model's inputs and targets on ``device``: ``{"image" [B, 3, S, S],
    "heatmap" [B, 1, h, h], "reg" [B, 4, h, h], "reg_mask" [B, h, h], "label" [B], "index" [B], "boxes" (list of
    [K, 4], CPU), ("teacher" [B, 3])}``.

    The head's square, the windows and the resize (:func:`blendsign.transforms.preprocess`, slice by slice, the
    one definition that serving also runs), the augmentation (:func:`blendsign.transforms.augment_images`, one
    ``grid_sample`` for the batch) and the detection targets (:func:`blendsign.targets.encode_targets_batch`) run
    on ``device`` without a host sync: on the GPU in the training process, so that loader workers only read.
    """

    cfg: DataConfig
    stride: int
    min_overlap: float

    def __call__(self, raw: dict[str, Any], device: torch.device) -> dict[str, Any]:
        non_blocking = device.type == "cuda"
        hu = raw["hu"].to(device, non_blocking=non_blocking)  # [B, rows_max, cols_max]
        images = torch.stack([
            preprocess(hu[b, :rows, :cols], self.cfg, (top, left, side) if side else None)
            for b, ((rows, cols), (top, left, side)) in enumerate(zip(raw["shape"].tolist(), raw["crop"].tolist(),
                                                                       strict=True))
        ])  # [B, 3, S, S]
        affine = raw["affine"]  # [B, 5], CPU
        if not torch.equal(affine, torch.tensor(IDENTITY).expand_as(affine)):
            images = augment_images(images, affine.to(device, non_blocking=non_blocking))
        boxes = raw["boxes"]
        counts = [len(b) for b in boxes]
        flat = torch.cat([b.reshape(-1, 4) for b in boxes]).to(device, non_blocking=non_blocking)  # [ΣK, 4]
        out = encode_targets_batch(list(flat.split(counts)), input_size=self.cfg.size, stride=self.stride,
                                   min_overlap=self.min_overlap, device=device)
        out.update(image=images, label=raw["label"].to(device, non_blocking=non_blocking), index=raw["index"],
                   boxes=boxes)
        if "teacher" in raw:
            out["teacher"] = raw["teacher"].to(device, non_blocking=non_blocking)
        return out


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, i)``: a permutation drawn from (seed, epoch), sharded by rank for DDP.

    Like ``DistributedSampler``, pads to a multiple of ``world`` so every rank sees as many samples.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world > 1:
            order += order[: (-len(order)) % self.world]
            order = order[self.rank :: self.world]
        return iter((self.epoch, i) for i in order)

    def __len__(self) -> int:
        return -(-self.n // self.world) if self.world > 1 else self.n


PREFETCH = 4  # batches each loader worker keeps ready
SHM = Path("/dev/shm")


def shared_memory_bytes(cfg: DataConfig, batch_size: int, *, margin: bool = True) -> int:
    """The ``/dev/shm`` a loader of ``cfg.workers`` workers needs: each worker's ``PREFETCH`` ready batches and
    the one it builds pass through shared memory as float32 images ``[B, 3, S, S]`` (the targets add about 2%;
    prepared on the device, a batch is int16 ``hu`` at native size, 6× less for 512² slices at ``S`` = 512: the
    bound holds for both). ``margin`` (what a mount is sized with): ×1.25 for the allocator, plus 256 MiB. No
    workers: none."""
    if cfg.workers == 0:
        return 0
    batches = cfg.workers * (PREFETCH + 1) * batch_size * 3 * cfg.size * cfg.size * 4 * 1.02
    return int(batches * 1.25) + (256 << 20) if margin else int(batches)


def check_shared_memory(cfg: DataConfig, batch_size: int, shm: Path = SHM) -> None:
    """Refuse to start loader workers that would die of "Bus error" half-way: ``/dev/shm`` smaller than the
    batches in flight (:func:`shared_memory_bytes` without its margin; containers get 64 MiB unless given more)."""
    need = shared_memory_bytes(cfg, batch_size, margin=False)
    if need == 0 or not shm.is_dir():
        return
    total = shutil.disk_usage(shm).total
    if total < need:
        raise ConfigError(f"{shm} holds {total / 2**20:.0f} MiB but {cfg.workers} loader workers at {cfg.size} px "
                         f"and batch {batch_size} need about {need / 2**20:.0f} MiB: give the container more (docker "
                         "--shm-size; Kubeflow: compile the pipeline with this preset, which sizes its /dev/shm "
                         "mount) or use fewer data.workers")


PREPARE_ON = ("auto", "device", "workers")


@dataclass(frozen=True)
class _CollatePrepared:
    """A loader's ``collate_fn`` that also runs :class:`Prepare` on the worker's CPU (``data.prepare_on``)."""

    prepare: Prepare

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.prepare(collate(samples), torch.device("cpu"))


class Loader:
    """Batches of :class:`Prepare`'s form on ``device``: prepared on ``device`` after the workers read them, or
    in the workers (``prepared_in_workers``). ``len`` and ``sampler`` are the wrapped ``DataLoader``'s."""

    def __init__(self, loader: DataLoader, prepare: Prepare, device: torch.device, *, in_workers: bool) -> None:
        self.loader, self.prepare, self.device, self.prepared_in_workers = loader, prepare, device, in_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield batch if self.prepared_in_workers else self.prepare(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> EpochSampler:
        return self.loader.sampler  # type: ignore[return-value]  # make_loader passes an EpochSampler


def make_loader(
    dataset: SliceDataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Loader:
    """A loader with a persistent worker pool whose batches are ready for the model on ``device``; call
    ``loader.sampler.set_epoch(e)`` each epoch.

    Where :class:`Prepare` runs is ``dataset.cfg.prepare_on``: ``device`` (the workers only read and decode
    ``hu``), ``workers`` (on their CPUs, as on a CPU-only machine where the training process has no spare
    core), ``auto`` (``device`` on CUDA, else ``workers``).
    """
    cfg = dataset.cfg
    if cfg.prepare_on not in PREPARE_ON:
        raise ConfigError(f"data.prepare_on must be one of {', '.join(PREPARE_ON)}, got {cfg.prepare_on!r}")
    in_workers = cfg.prepare_on == "workers" or (cfg.prepare_on == "auto" and device.type != "cuda")
    check_shared_memory(replace(cfg, workers=workers), batch_size)
    prepare = Prepare(cfg, dataset.stride, dataset.min_overlap)
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world=world)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        collate_fn=_CollatePrepared(prepare) if in_workers else collate,
        drop_last=False,
        prefetch_factor=PREFETCH if workers > 0 else None,
    )
    return Loader(loader, prepare, device, in_workers=in_workers)


# --- the slices of one training job: (training, held-out) for a fold ------------------------------------


def check_data(train: SliceIndex, val: SliceIndex | None, fold: int | None) -> None:
    """Refuse a fold that cannot train or validate, with a message that says why."""
    where = "the training data" if fold is None else f"the training folds of fold {fold}"
    if len(train) == 0:
        raise InputError(f"{where} hold no labelled slice")
    missing = [CLASSES[c] for c, n in enumerate(train.class_counts()) if n == 0]
    if missing:
        raise InputError(f"class(es) {', '.join(missing)} have no slice in {where}: the weighted loss and the "
                         "per-class metrics need every class; use more scans or fewer folds")
    if val is not None and len(val) == 0:
        raise InputError(f"fold {fold} is empty: no labelled slice to validate on")


def split_index(
    ingest_dir: str | Path, labels_dir: str | Path, folds_dir: str | Path | None, fold: int | None
) -> tuple[SliceIndex, SliceIndex | None]:
    """(training slices, held-out slices) for ``fold``; ``fold=None``: every slice, no held-out part."""
    if fold is None:
        return load_index(ingest_dir, labels_dir, folds_dir), None
    if folds_dir is None:
        raise InputError("a fold needs the folds folder (folds.parquet)")
    folds_all = set(load_index(ingest_dir, labels_dir, folds_dir).fold.tolist())
    if fold not in folds_all:
        raise InputError(f"fold {fold} does not exist (folds: {sorted(folds_all)})")
    return (load_index(ingest_dir, labels_dir, folds_dir, folds=folds_all - {fold}),
            load_index(ingest_dir, labels_dir, folds_dir, folds=[fold]))


def training_data(cfg: Config, ingest_dir: str | Path, labels_dir: str | Path, folds_dir: str | Path | None,
                  fold: int | None) -> tuple[SliceIndex, SliceIndex | None, str]:
    """(training slices, held-out slices, digest) as ``train`` uses them for ``fold`` (label noise included).

    The digest identifies what a model was trained on: the ingested dataset, the training slices with their
    labels and boxes, and the held-out slices. A folder holding a model trained on anything else is trained
    anew, and ``evaluate`` refuses to score a model on a split it was not trained for.
    """
    train_index, val_index = split_index(ingest_dir, labels_dir, folds_dir, fold)
    if cfg.train.label_noise > 0:
        train_index = inject_label_noise(train_index, cfg.train.label_noise, seed=cfg.train.seed)
    digest = hashlib.sha256(data_fingerprint(ingest_dir).encode())
    for index in (train_index, val_index):
        content = None if index is None else [list(index.instance_key), index.label.tolist(),
                                              [b.tolist() for b in index.boxes]]
        digest.update(json.dumps(content).encode())
    return train_index, val_index, digest.hexdigest()


def inject_label_noise(index: SliceIndex, share: float, *, seed: int) -> SliceIndex:
    """Relabel a random ``share`` of the blend-sign slices as normal ICH (the ablation's reader noise).

    The flipped positions are recorded in ``index.noisy``.
    """
    rng = np.random.default_rng(seed + 7919)
    blend = np.flatnonzero(index.label == CLASSES.index("blend_sign"))
    flip = rng.choice(blend, size=round(share * len(blend)), replace=False) if len(blend) else blend
    label, noisy = index.label.copy(), np.zeros(len(index), dtype=bool)
    label[flip] = CLASSES.index("normal_ich")
    noisy[flip] = True
    return dataclasses.replace(index, label=label, noisy=noisy)
