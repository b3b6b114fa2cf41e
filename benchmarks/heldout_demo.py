"""The registered champion on a synthetic cohort it never saw: per-class metrics beside the no-skill prior.

    python benchmarks/heldout_demo.py [--model models:/blendsign@champion] [--tracking-uri URI]
                                      [--seed 1000] [--work DIR]

Synthesises the ``demo`` cohort with another seed (the demo trains on seed 0), ingests and fuses it exactly as
the pipeline does, scores every labelled slice through the served preprocessing and prints JSON: class counts,
accuracy against the majority class's share, per-class sensitivity / specificity / AUC and the scan-level
triage AUCs. Run it after ``make demo`` (its store is ``.blendsign/mlflow.db``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from blendsign.config import load_preset
from blendsign.data import load_index, read_slice_hu
from blendsign.ingest import ingest
from blendsign.labels import fuse
from blendsign.metrics import per_class_metrics, scan_auc
from blendsign.model_package import load
from blendsign.serving import to_model_input
from blendsign.synth import synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models:/blendsign@champion")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('.blendsign/mlflow.db').resolve()}")
    parser.add_argument("--seed", type=int, default=1000, help="synthetic cohort seed (the demo trains on 0)")
    parser.add_argument("--work", type=Path, default=None, help="keep the cohort here (default: a temporary folder)")
    args = parser.parse_args()
    cfg = load_preset("demo")
    with tempfile.TemporaryDirectory(prefix="blendsign-heldout-") as tmp:
        root = args.work or Path(tmp)
        if not (root / "labels" / "labels.parquet").is_file():
            synthesize(root / "src", replace(cfg.synth, seed=args.seed), progress=False)
            ingest(root / "src" / "dicom", root / "ingest", cfg.ingest, progress=False)
            fuse(root / "src" / "annotations.csv", root / "ingest", root / "labels", cfg.labels)
        index = load_index(root / "ingest", root / "labels")
        model = load(args.model, tracking_uri=args.tracking_uri, model_config={"device": "cpu"}).unwrap_python_model()
        probs = []
        for start in range(0, len(index), 16):
            x = torch.stack([
                to_model_input(read_slice_hu(index.file[i], int(index.row_group[i]), int(index.offset[i]),
                                             int(index.rows[i]), int(index.cols[i])), model.data_config)
                for i in range(start, min(start + 16, len(index)))
            ])
            probs.append(model.probabilities(x))
    p = np.concatenate(probs).astype(np.float64)
    counts = np.bincount(index.label, minlength=3)
    m = per_class_metrics(p, index.label)
    out = {"seed": args.seed, "scans": len(set(index.scan_id)), "slices": len(index), "counts": counts.tolist(),
           "accuracy": m["accuracy"], "majority_share": float(counts.max() / counts.sum()),
           **{k: v for k, v in m.items() if k.startswith(("auc", "sensitivity", "specificity"))},
           **{f"scan_{k}": v for k, v in scan_auc(p, index.label, np.asarray(index.scan_id)).items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
