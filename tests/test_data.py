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
from blendsign.data import EpochSampler, SliceDataset, collate, load_index, read_slice_hu
from blendsign.errors import InputError
from blendsign.ingest import FORMAT_VERSION, MANIFEST
from blendsign.transforms import preprocess

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


def test_sample_is_the_shared_preprocessing_of_the_stored_hu(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    ds = SliceDataset(index, CFG.data, stride=32, min_overlap=0.7, augment=False)
    i = int(np.flatnonzero(index.label == 2)[0])  # a blend-sign slice, which has boxes
    sample = ds[i]
    hu = read_slice_hu(index.file[i], int(index.row_group[i]), int(index.offset[i]),
                       int(index.rows[i]), int(index.cols[i]))
    torch.testing.assert_close(sample["image"], preprocess(torch.from_numpy(hu.copy()), CFG.data))
    assert sample["label"] == 2 and sample["boxes"].shape[0] >= 1
    assert sample["heatmap"].shape == (1, 2, 2) and sample["reg"].shape == (4, 2, 2)
    batch = collate([ds[0], ds[i]])
    assert batch["image"].shape == (2, 3, 64, 64) and len(batch["boxes"]) == 2


def test_augmentation_is_a_function_of_seed_epoch_and_index(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    ds = SliceDataset(index, CFG.data, stride=32, min_overlap=0.7, augment=True, seed=5)
    a, b, c = ds[(1, 3)], ds[(1, 3)], ds[(2, 3)]
    torch.manual_seed(123)  # the global RNG plays no part
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])


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
