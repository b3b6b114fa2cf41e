"""blendsign.ood: the Mahalanobis out-of-distribution flag, on Gaussian features and on a trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from blendsign import ood


def gaussian(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes in 16 dimensions (means ±2 on the first axis), correlated noise; 40 groups."""
    mix = np.random.default_rng(99).normal(size=(16, 16)) / 4 + np.eye(16)  # one distribution for every seed
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    features = rng.normal(size=(n, 16)) @ mix
    features[:, 0] += np.where(labels == 1, 2.0, -2.0) + shift
    return features, labels, rng.integers(0, 40, n)


def test_threshold_leaves_unseen_in_distribution_slices_unflagged_and_flags_far_ones() -> None:
    features, labels, groups = gaussian(4000, 0)
    state = ood.fit(features, labels, groups)
    assert state["quantile"] == 0.99 and state["mean"].shape == (2, 16) and state["precision"].shape == (16, 16)
    unseen, _, _ = gaussian(4000, 1)
    flagged = (ood.score(state, torch.from_numpy(unseen)) > 1).float().mean().item()
    assert flagged == pytest.approx(0.01, abs=0.01)  # the threshold is the held-out 0.99 quantile
    far, _, _ = gaussian(200, 2, shift=12.0)
    assert (ood.score(state, torch.from_numpy(far)) > 1).all()
    # the score is the Mahalanobis distance to the nearest class mean, over the threshold
    means, precision = state["mean"].double().numpy(), state["precision"].double().numpy()
    x = unseen[:3]
    d = np.sqrt(np.min([np.einsum("nc,cd,nd->n", x - m, precision, x - m) for m in means], axis=0))
    np.testing.assert_allclose(ood.score(state, torch.from_numpy(x)).numpy(), d / state["threshold"], rtol=1e-4)


def test_conformal_quantile() -> None:
    scores = np.arange(1.0, 201.0)  # 200 scores: ⌈201 · 0.99⌉ = 199th smallest
    assert ood.conformal_quantile(scores, 0.99) == 199.0
    assert ood.conformal_quantile(scores[:50], 0.99) == 50.0  # too few for 0.99: the largest


@pytest.mark.slow
def test_a_registered_model_carries_its_statistics_and_scores_real_slices(cohort: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """Trained on the synthetic cohort and logged as the served model: its own (slimmed) checkpoint keeps the
    OOD state, every scored slice gets ood_score = the state's score of its pooled features, and the flag is
    score > 1. (Whether real CT is flagged depends on how well the model is trained: README, "What the demo's model
    learns".)"""
    from blendsign import model_package
    from blendsign.config import load_preset, override
    from blendsign.serving import DICOM_COLUMN, read_slice, to_model_input
    from blendsign.tracking import Tracker
    from blendsign.train import train
    from tests.served import dicom_bytes

    cfg = override(load_preset("ci"), train={"epochs": 2})
    result = train(cfg, ingest_dir=cohort["ingest"], labels_dir=cohort["labels"], folds_dir=cohort["folds"], fold=0,
                   out_dir=tmp_path / "fold0", progress=False)
    checkpoint = result.out_dir / "model.pt"
    state = torch.load(checkpoint, weights_only=True)["ood"]
    assert state["threshold"] > 0 and state["quantile"] == ood.QUANTILE
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.open(uri=uri)
    with tracker.run("teacher") as run:
        pass
    logged = model_package.load(model_package.log_model(run_id=run.run_id, tracking_uri=uri, checkpoints=[checkpoint]),
                                tracking_uri=uri, model_config={"device": "cpu"})
    names = ("J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm")
    out = logged.predict(pd.DataFrame({DICOM_COLUMN: [dicom_bytes(n) for n in names]}))
    assert out["error"].isna().all()
    net = logged.unwrap_python_model()._loaded().models[0]
    x = torch.stack([to_model_input(read_slice(dicom_bytes(n)), cfg.data) for n in names])
    with torch.no_grad():
        expected = ood.score(state, net(x)["features"].mean(dim=(2, 3))).numpy()
    np.testing.assert_allclose(out["ood_score"].astype(float).to_numpy(), expected, rtol=1e-4)
    assert out["out_of_distribution"].tolist() == (expected > 1).tolist()
