"""blendsign.data: the index joins labels, folds and scan files; samples are deterministic per (epoch, i)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from blendsign.config import load_preset
from blendsign.data import EpochSampler, Prepare, SliceDataset, collate, load_index, make_loader, read_slice_hu
from blendsign.errors import ConfigError, InputError
from blendsign.ingest import FORMAT_VERSION, MANIFEST
from blendsign.targets import encode_targets
from blendsign.transforms import AIR_HU, IDENTITY, augment_boxes, augment_images, preprocess

CFG = load_preset("ci")


def test_index_joins_labels_and_folds(cohort: dict[str, Path]) -> None:
    labels = pq.read_table(cohort["labels"] / "labels.parquet").to_pylist()
    everything = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    assert len(everything) == len(labels)
    parts = [load_index(cohort["ingest"], cohort["labels"], cohort["folds"], folds=[k]) for k in range(3)]
    assert sum(len(p) for p in parts) == len(labels)
    assert all(set(p.fold.tolist()) == {k} for k, p in enumerate(parts))
    # every indexed slice points at the row holding its instance_key
    for i in range(0, len(everything), 7):
        table = pq.ParquetFile(everything.file[i]).read_row_group(int(everything.row_group[i]))
        assert table.column("instance_key")[int(everything.offset[i])].as_py() == everything.instance_key[i]


CPU = torch.device("cpu")


def _prepared(ds: SliceDataset, keys: list[int | tuple[int, int]]) -> dict:
    return Prepare(ds.cfg, ds.stride, ds.min_overlap)(collate([ds[k] for k in keys]), CPU)


def test_a_prepared_sample_is_the_shared_preprocessing_of_the_stored_hu(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    ds = SliceDataset(index, CFG.data, stride=32, min_overlap=0.7, augment=False)
    i = int(np.flatnonzero(index.label == 2)[0])  # a blend-sign slice, which has boxes
    hu = read_slice_hu(index.file[i], int(index.row_group[i]), int(index.offset[i]),
                       int(index.rows[i]), int(index.cols[i]))
    raw = ds[i]  # what a worker makes: the stored HU, no float image
    assert raw["hu"].dtype == torch.int16 and torch.equal(raw["hu"], torch.from_numpy(hu.copy()))
    assert raw["label"] == 2 and raw["boxes"].shape[0] >= 1 and raw["affine"].tolist() == list(IDENTITY)
    batch = _prepared(ds, [0, i])
    torch.testing.assert_close(batch["image"][1], preprocess(torch.from_numpy(hu.copy()), CFG.data))
    assert batch["image"].shape == (2, 3, 64, 64) and len(batch["boxes"]) == 2
    assert batch["heatmap"].shape == (2, 1, 2, 2) and batch["reg"].shape == (2, 4, 2, 2)
    one = encode_targets(raw["boxes"], input_size=64, stride=32, min_overlap=0.7)
    for key in ("heatmap", "reg", "reg_mask"):
        torch.testing.assert_close(batch[key][1], one[key])


def test_collate_pads_slices_of_differing_sizes_with_air() -> None:
    def sample(rows: int, cols: int) -> dict:
        return {"hu": torch.full((rows, cols), 40, dtype=torch.int16), "crop": torch.zeros(3, dtype=torch.int64),
                "affine": torch.tensor(IDENTITY), "boxes": torch.zeros(0, 4), "label": 0, "index": 0}

    batch = collate([sample(4, 6), sample(5, 3)])
    assert batch["hu"].shape == (2, 5, 6) and batch["shape"].tolist() == [[4, 6], [5, 3]]
    assert (batch["hu"][0, 4] == AIR_HU).all() and (batch["hu"][1, :, 3:] == AIR_HU).all()
    assert (batch["hu"][0, :4] == 40).all() and (batch["hu"][1, :, :3] == 40).all()
    cfg = replace(CFG.data, size=8, crop_head=False)
    images = Prepare(cfg, 4, 0.7)(batch, CPU)["image"]  # each slice resized from its own extent, not the padding
    torch.testing.assert_close(images[1], preprocess(torch.full((5, 3), 40, dtype=torch.int16), cfg))


def test_augmentation_is_a_function_of_seed_epoch_and_index(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    ds = SliceDataset(index, CFG.data, stride=32, min_overlap=0.7, augment=True, seed=5)
    a, b, c = _prepared(ds, [(1, 3)]), _prepared(ds, [(1, 3)]), _prepared(ds, [(2, 3)])
    torch.manual_seed(123)  # the global RNG plays no part
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])


def test_prepared_batch_is_the_augmentation_of_the_preprocessed_slices(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    plain = SliceDataset(index, CFG.data, stride=32, min_overlap=0.7, augment=False)
    ds = SliceDataset(index, CFG.data, stride=32, min_overlap=0.7, augment=True, seed=5)
    keys = [(4, i) for i in range(6)]
    batch, raw = _prepared(ds, keys), [ds[k] for k in keys]
    images = _prepared(plain, [i for _, i in keys])["image"]
    affine = torch.stack([r["affine"] for r in raw])
    torch.testing.assert_close(batch["image"], augment_images(images, affine))
    boxes = augment_boxes([plain[i]["boxes"] for _, i in keys], affine, CFG.data.size)
    for got, want in zip(batch["boxes"], boxes, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("workers", [0, 2])
def test_preparing_in_the_workers_or_on_the_device_gives_the_same_batches(cohort: dict[str, Path],
                                                                            workers: int) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"], folds=[0])
    batches = {}
    for where in ("workers", "device"):
        ds = SliceDataset(index, replace(CFG.data, prepare_on=where), stride=32, min_overlap=0.7, augment=True,
                          seed=1)
        loader = make_loader(ds, batch_size=4, shuffle=True, workers=workers, device=CPU, seed=1)
        assert loader.prepared_in_workers == (where == "workers")
        loader.sampler.set_epoch(2)
        batches[where] = list(loader)
    assert len(batches["workers"]) == len(batches["device"]) == -(-len(index) // 4)
    for a, b in zip(batches["workers"], batches["device"], strict=True):
        for key in ("image", "heatmap", "reg", "reg_mask", "label", "index"):
            torch.testing.assert_close(a[key], b[key])


def test_prepare_on_is_checked(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"], folds=[0])
    ds = SliceDataset(index, replace(CFG.data, prepare_on="gpu"), stride=32, min_overlap=0.7, augment=False)
    with pytest.raises(ConfigError, match=r"data\.prepare_on must be one of auto, device, workers, got 'gpu'"):
        make_loader(ds, batch_size=4, shuffle=False, workers=0, device=CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepare_on_cuda_matches_the_cpu_and_never_waits_for_the_device(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    ds = SliceDataset(index, replace(CFG.data, crop_head=True), stride=32, min_overlap=0.7, augment=True, seed=2)
    raw = collate([ds[(0, i)] for i in range(8)])
    prepare, cuda = Prepare(ds.cfg, 32, 0.7), torch.device("cuda")
    want = prepare(raw, CPU)
    pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) and k != "index" else v for k, v in raw.items()}
    prepare(pinned, cuda)  # warm-up: cached window bounds, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = prepare(pinned, cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for key in ("image", "heatmap", "reg"):
        torch.testing.assert_close(got[key].cpu(), want[key], atol=1e-5, rtol=0)
    assert torch.equal(got["reg_mask"].cpu(), want["reg_mask"])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_sampler_shards_cover_everything(world: int) -> None:
    seen = []
    for rank in range(world):
        s = EpochSampler(10, shuffle=True, seed=1, rank=rank, world=world)
        s.set_epoch(4)
        items = list(s)
        assert len(items) == len(s) and all(e == 4 for e, _ in items)
        seen += [i for _, i in items]
    assert set(seen) == set(range(10))
    a, b = EpochSampler(10, shuffle=True, seed=1), EpochSampler(10, shuffle=True, seed=1)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_teacher_soft_labels_are_checked(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"], folds=[0])
    with pytest.raises(ValueError, match="teacher soft labels"):
        SliceDataset(index, replace(CFG.data), stride=32, min_overlap=0.7, augment=False, teacher=np.ones((1, 3)))
    ds = SliceDataset(index, CFG.data, stride=32, min_overlap=0.7, augment=False,
                      teacher=np.full((len(index), 3), 1 / 3))
    assert ds[0]["teacher"].shape == (3,)


def test_an_ingest_in_an_older_format_is_refused_with_what_to_do(cohort: dict[str, Path], tmp_path: Path) -> None:
    old = tmp_path / "ingest"
    shutil.copytree(cohort["ingest"], old)
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "format": "1"}))
    with pytest.raises(InputError, match=f"dataset format 1; this blendsign reads format {FORMAT_VERSION} .*ingest "
                                         "the DICOM again"):
        load_index(old, cohort["labels"], cohort["folds"])
