"""Champion and challenger on the same held-out scans: the scans of this run the champion never trained on.

A registered version records which scans it was trained with (``registry/training_scans.json`` on its register
run, :func:`write_training_scans`: the ingest manifest's pseudonymous scan ids, every scan of the dataset, which
both the refit and the fold ensemble saw). After cross-validation, :func:`compare` scores the champion of the
run's start on this dataset's scans outside that list, and reads the challenger's out-of-fold predictions of
the same slices (each scored by a fold model that did not train on it): ``head_to_head.json`` beside
``metrics.json`` holds both models' per-class metrics there, or why there is no comparison (no champion, no
scan list, no scan the champion has not seen). The registry's gate uses it when the champion is still the one
compared (:func:`blendsign.registry.prepare`).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from blendsign import CLASSES
from blendsign.storage import write_json_atomic

log = logging.getLogger(__name__)

FILE = "head_to_head.json"
SCANS_ARTIFACT = "registry/training_scans.json"
CHAMPION_TAG = "champion_at_start"  # parent-run tag: the champion when the run started (check_new_data)
MODEL_TAG = "registered_model"


@dataclass(frozen=True)
class HeadToHead:
    """Both models' metrics (``per_class_metrics`` keys) on ``scans`` scans / ``slices`` slices, or a ``reason``."""

    champion_version: str | None
    scans: int = 0
    slices: int = 0
    challenger: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why there is no comparison ("" when there is one)

    def values(self, metric: str) -> tuple[float, float] | None:
        """(challenger, champion) of ``cv_<metric>``, or None when either is missing or undefined."""
        key = metric.removeprefix("cv_")
        pair = (self.challenger.get(key, math.nan), self.champion.get(key, math.nan))
        return None if self.reason or any(math.isnan(v) for v in pair) else pair

    def write(self, out_dir: str | Path) -> None:
        write_json_atomic(Path(out_dir) / FILE, asdict(self))

    @classmethod
    def read(cls, out_dir: str | Path) -> HeadToHead | None:
        path = Path(out_dir) / FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def write_training_scans(manifest: dict[str, Any], path: str | Path) -> None:
    """The scans a registered model was trained with (every scan of its dataset's ``manifest``)."""
    write_json_atomic(path, {"scans": sorted(s["scan_id"] for s in manifest["scans"])})


def read_training_scans(client: Any, run_id: str) -> set[str] | None:
    """The scan ids a version's register run recorded; None when it recorded none (registered before)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="blendsign-scans-") as tmp:
        try:
            path = client.download_artifacts(run_id, SCANS_ARTIFACT, tmp)
        except (MlflowException, OSError):
            return None
        return set(json.loads(Path(path).read_text())["scans"])


def _challenger_rows(predictions: Path, scans: set[str]) -> dict[tuple[str, int], tuple[int, np.ndarray]]:
    """Out-of-fold predictions of ``scans``: (scan, slice index) → (label index, probabilities [K])."""
    table = pq.read_table(predictions).to_pydict()
    out = {}
    for i, scan in enumerate(table["scan_id"]):
        if scan in scans:
            probs = np.array([table[f"p_{c}"][i] for c in CLASSES], dtype=np.float64)
            out[(scan, int(table["slice_index"][i]))] = (CLASSES.index(table["label"][i]), probs)
    return out


def compare(*, client: Any, tracking_uri: str, name: str, champion_version: str | None, ingest_dir: str | Path,
            labels_dir: str | Path, folds_dir: str | Path, predictions: str | Path, device: str = "auto",
            batch_size: int = 16) -> HeadToHead:
    """Score ``name`` v``champion_version`` on this dataset's scans it never trained on; the challenger's
    out-of-fold ``predictions`` of the same slices beside it (see the module docstring)."""
    import torch

    from blendsign.data import load_index, read_slice_hu
    from blendsign.metrics import per_class_metrics
    from blendsign.model_package import download
    from blendsign.serving import BlendSignModel, to_model_input

    if champion_version is None:
        return HeadToHead(None, reason=f"{name} had no champion when this run started")
    version = client.get_model_version(name, champion_version)
    seen = read_training_scans(client, version.run_id)
    if seen is None:
        return HeadToHead(champion_version, reason=f"champion v{champion_version} records no training scans "
                                                   "(registered before they were recorded)")
    index = load_index(ingest_dir, labels_dir, folds_dir)
    challenger = _challenger_rows(Path(predictions), set(index.scan_id) - seen)
    rows = [i for i in range(len(index)) if (index.scan_id[i], int(index.slice_index[i])) in challenger]
    if not rows:
        return HeadToHead(champion_version, reason=f"champion v{champion_version} trained on every scan of this "
                                                   "dataset")
    model = BlendSignModel()
    with tempfile.TemporaryDirectory(prefix="blendsign-champion-") as tmp:
        folder = download(f"models:/{name}/{champion_version}", Path(tmp) / "model", tracking_uri=tracking_uri)
        model.load_checkpoints(sorted((folder / "artifacts").glob("*.pt")), device=device)
    probs = []
    for start in range(0, len(rows), batch_size):
        batch = [to_model_input(read_slice_hu(index.file[i], int(index.row_group[i]), int(index.offset[i]),
                                              int(index.rows[i]), int(index.cols[i])), model.data_config)
                 for i in rows[start : start + batch_size]]
        probs.append(model.probabilities(torch.stack(batch)))
    keys = [(index.scan_id[i], int(index.slice_index[i])) for i in rows]
    labels = np.array([challenger[k][0] for k in keys], dtype=np.int64)
    result = HeadToHead(
        champion_version, scans=len({k[0] for k in keys}), slices=len(keys),
        challenger=per_class_metrics(np.stack([challenger[k][1] for k in keys]), labels),
        champion=per_class_metrics(np.concatenate(probs).astype(np.float64), labels))
    log.info("head to head on %d scans (%d slices) champion v%s never trained on: auc_blend_sign challenger %.4f, "
             "champion %.4f", result.scans, result.slices, champion_version, result.challenger["auc_blend_sign"],
             result.champion["auc_blend_sign"])
    return result
