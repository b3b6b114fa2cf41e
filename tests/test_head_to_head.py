"""Champion and challenger on the scans the champion never trained on (a real registry, the session's cohort)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from blendsign import CLASSES
from blendsign.data import load_index, read_slice_hu
from blendsign.head_to_head import SCANS_ARTIFACT, HeadToHead, compare
from blendsign.metrics import per_class_metrics
from blendsign.model import load_trained
from blendsign.registry import prepare, register_version
from blendsign.tracking import Tracker
from blendsign.transforms import preprocess
from tests.served import make_checkpoint


def _champion(tracker: Tracker, checkpoint: Path, scans: list[str] | None, tmp_path: Path) -> str:
    """``checkpoint`` registered, its register run recording ``scans`` (None: recording nothing)."""
    from blendsign import model_package

    with tracker.run("register") as run:
        model_package.log_model(run_id=run.run_id, tracking_uri=tracker.uri, checkpoints=[checkpoint],
                                registered_model_name="h2h")
        if scans is not None:
            (tmp_path / "training_scans.json").write_text(json.dumps({"scans": scans}))
            run.log_artifact(tmp_path / "training_scans.json", str(Path(SCANS_ARTIFACT).parent))
    version, _ = register_version(tracker.client, name="h2h", run_id=run.run_id, metric="cv_auc_blend_sign",
                                  value=0.8, margin=0.0, tags={}, card="card")
    return version


def _predictions(index: Any, path: Path) -> np.ndarray:
    """Out-of-fold predictions as ``evaluate`` writes them: here the truth, softened (every AUC is 1)."""
    probs = np.full((len(index), len(CLASSES)), 0.1)
    probs[np.arange(len(index)), index.label] = 0.8
    pq.write_table(pa.table({"scan_id": list(index.scan_id), "slice_index": index.slice_index.tolist(),
                             "label": [CLASSES[c] for c in index.label],
                             **{f"p_{c}": probs[:, j] for j, c in enumerate(CLASSES)}}), path)
    return probs


def test_the_champion_is_scored_on_the_scans_it_never_saw(cohort: dict[str, Path], tmp_path: Path) -> None:
    dirs = {"ingest_dir": cohort["ingest"], "labels_dir": cohort["labels"], "folds_dir": cohort["folds"]}
    index = load_index(**dirs)
    seen = sorted({s for s, f in zip(index.scan_id, index.fold.tolist(), strict=True) if f != 2})
    tracker = Tracker.open("h2h", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_checkpoint(tmp_path / "champion.pt", seed=5)
    version = _champion(tracker, tmp_path / "champion.pt", seen, tmp_path)
    _predictions(index, tmp_path / "predictions.parquet")

    result = compare(client=tracker.client, tracking_uri=tracker.uri, name="h2h", champion_version=version,
                     predictions=tmp_path / "predictions.parquet", device="cpu", batch_size=5, **dirs)
    new = np.array([f == 2 for f in index.fold.tolist()])
    assert result.reason == "" and result.champion_version == version
    assert result.scans == len({s for s, n in zip(index.scan_id, new, strict=True) if n}) > 0
    assert result.slices == int(new.sum())
    labels = index.label[new]
    assert result.challenger["auc_blend_sign"] == 1.0 and result.challenger["accuracy"] == 1.0
    net, cfg, _ = load_trained(tmp_path / "champion.pt", torch.device("cpu"))  # the champion's scores by hand
    rows = np.flatnonzero(new)
    with torch.no_grad():
        x = torch.stack([preprocess(torch.from_numpy(read_slice_hu(index.file[i], int(index.row_group[i]),
                                                                   int(index.offset[i]), int(index.rows[i]),
                                                                   int(index.cols[i]))), cfg.data) for i in rows])
        probs = net(x)["logits"].softmax(dim=1).numpy().astype(np.float64)
    expected = per_class_metrics(probs, labels)
    assert result.champion.keys() == expected.keys()
    for key, value in expected.items():
        assert result.champion[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key

    result.write(tmp_path)
    assert HeadToHead.read(tmp_path) == result
    assert result.values("cv_auc_blend_sign") == (1.0, result.champion["auc_blend_sign"])


def test_no_comparison_says_why(cohort: dict[str, Path], tmp_path: Path) -> None:
    dirs = {"ingest_dir": cohort["ingest"], "labels_dir": cohort["labels"], "folds_dir": cohort["folds"]}
    index = load_index(**dirs)
    tracker = Tracker.open("h2h", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_checkpoint(tmp_path / "champion.pt")
    _predictions(index, tmp_path / "predictions.parquet")
    args = {"client": tracker.client, "tracking_uri": tracker.uri, "name": "h2h",
            "predictions": tmp_path / "predictions.parquet", "device": "cpu", **dirs}
    assert compare(champion_version=None, **args).reason == "h2h had no champion when this run started"
    old = _champion(tracker, tmp_path / "champion.pt", None, tmp_path)
    assert "records no training scans" in compare(champion_version=old, **args).reason
    every = _champion(tracker, tmp_path / "champion.pt", sorted(set(index.scan_id)), tmp_path)
    assert compare(champion_version=every, **args).reason == f"champion v{every} trained on every scan of this " \
                                                             "dataset"


def test_the_gate_compares_on_the_held_out_scans_when_the_champion_is_still_the_one_compared(tmp_path: Path) -> None:
    tracker = Tracker.open("gate", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, name, metric = tracker.client, "gate", "cv_auc_blend_sign"
    client.create_registered_model(name)

    def run_id() -> str:
        with tracker.run("register") as run:
            pass
        client.create_model_version(name, source=f"runs:/{run.run_id}/model", run_id=run.run_id)
        return run.run_id

    v1, _ = register_version(client, name=name, run_id=run_id(), metric=metric, value=0.95, margin=0.0, tags={},
                             card="1")
    h2h = HeadToHead(v1, scans=4, slices=30, challenger={"auc_blend_sign": 0.90}, champion={"auc_blend_sign": 0.70})
    # Its CV value (0.85) is below the champion's (0.95), but on the same new scans it wins.
    reg = prepare(client, name=name, run_id=run_id(), metric=metric, value=0.85, margin=0.05, head_to_head=h2h)
    assert reg.promotion.promoted and reg.promotion.champion_value == 0.70 and reg.value == 0.85
    assert "0.9000 beats champion v1 (0.7000) by more than 0.05 (both on the 4 scans (30 slices)" in reg.promotion.text
    stale = HeadToHead("7", scans=4, slices=30, challenger={"auc_blend_sign": 0.9}, champion={"auc_blend_sign": 0.7})
    other = prepare(client, name=name, run_id=run_id(), metric=metric, value=0.85, margin=0.0, head_to_head=stale)
    assert not other.promotion.promoted and "made with v7, not the current champion" in other.promotion.text
    none = HeadToHead(v1, reason=f"champion v{v1} trained on every scan of this dataset")
    cv = prepare(client, name=name, run_id=run_id(), metric=metric, value=0.99, margin=0.0, head_to_head=none)
    assert cv.promotion.promoted and cv.promotion.text.endswith(f"no held-out comparison: champion v{v1} trained "
                                                                "on every scan of this dataset)")
