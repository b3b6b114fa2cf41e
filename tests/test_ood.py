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
def test_a_model_trained_on_the_synthetic_cohort_flags_real_head_ct(cohort: dict[str, Path], tmp_path: Path) -> None:
    """Trained on synthetic slices, the model calls pydicom's two real head-CT slices out of distribution; the
    held-out synthetic slices of its own cohort mostly not."""
    from blendsign.config import load_preset, override
    from blendsign.data import SliceDataset, make_loader
    from blendsign.engine import predict
    from blendsign.serving import DICOM_COLUMN, BlendSignModel
    from blendsign.train import train, training_data
    from tests.served import dicom_bytes

    cfg = override(load_preset("ci"), train={"epochs": 6})
    result = train(cfg, ingest_dir=cohort["ingest"], labels_dir=cohort["labels"], folds_dir=cohort["folds"], fold=0,
                   out_dir=tmp_path / "fold0", progress=False)
    checkpoint = result.out_dir / "model.pt"
    state = torch.load(checkpoint, weights_only=True)["ood"]
    model = BlendSignModel()
    model.load_checkpoints([checkpoint], device="cpu")
    out = model.predict(None, pd.DataFrame({DICOM_COLUMN: [dicom_bytes("J2K_pixelrep_mismatch.dcm"),
                                                           dicom_bytes("693_J2KI.dcm")]}))
    assert out["error"].isna().all()
    assert out["out_of_distribution"].tolist() == [True, True], out["ood_score"].tolist()
    _, val, _ = training_data(cfg, cohort["ingest"], cohort["labels"], cohort["folds"], 0)
    net = model._loaded().models[0]
    ds = SliceDataset(val, cfg.data, stride=net.stride, min_overlap=cfg.loss.gaussian_min_overlap, augment=False)
    pred = predict(net, make_loader(ds, batch_size=8, shuffle=False, workers=0), device=torch.device("cpu"),
                   progress=False)
    held_out = (ood.score(state, torch.from_numpy(pred["features"])) > 1).float().mean().item()
    assert held_out <= 0.05, held_out
