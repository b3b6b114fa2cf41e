"""blendsign.ood: the Mahalanobis out-of-distribution flag, on Gaussian features and on a trained model."""

from __future__ import annotations

from dataclasses import replace
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
    state = ood.fit([features], labels, groups)
    (stage,) = state["stages"]
    assert state["quantile"] == 0.99 and state["version"] == ood.VERSION
    assert stage["mean"].shape == (2, 16) and stage["precision"].shape == (16, 16)
    unseen, _, _ = gaussian(4000, 1)
    flagged = (ood.score(state, [torch.from_numpy(unseen)]) > 1).float().mean().item()
    assert flagged == pytest.approx(0.01, abs=0.01)  # the threshold is the held-out 0.99 quantile
    far, _, _ = gaussian(200, 2, shift=12.0)
    assert (ood.score(state, [torch.from_numpy(far)]) > 1).all()
    # the score is the Mahalanobis distance to the nearest class mean, over the threshold
    means, precision = stage["mean"].double().numpy(), stage["precision"].double().numpy()
    x = unseen[:3]
    d = np.sqrt(np.min([np.einsum("nc,cd,nd->n", x - m, precision, x - m) for m in means], axis=0))
    np.testing.assert_allclose(ood.score(state, [torch.from_numpy(x)]).numpy(), d / stage["threshold"], rtol=1e-4)


def test_stages_share_the_false_flag_budget_and_any_stage_can_flag() -> None:
    """Four independent stages: each threshold is the 1 − 0.01/4 quantile, so the maximum over stages still flags
    about 1% of unseen in-distribution slices; a shift in one stage alone (an early one: texture) flags."""
    fitted = [gaussian(4000, 10 + k) for k in range(4)]
    labels, groups = fitted[0][1], fitted[0][2]
    state = ood.fit([f for f, _, _ in fitted], labels, groups)
    assert len(state["stages"]) == 4
    unseen = [torch.from_numpy(gaussian(4000, 20 + k)[0]) for k in range(4)]
    flagged = (ood.score(state, unseen) > 1).float().mean().item()
    assert flagged == pytest.approx(0.01, abs=0.01)
    shifted = [torch.from_numpy(gaussian(200, 30, shift=12.0)[0]), *unseen[1:]]
    assert (ood.score(state, [s[:200] for s in shifted]) > 1).all()
    with pytest.raises(ValueError, match="3 stages of statistics for an OOD state of 4"):
        ood.score(state, unseen[:3])


def test_an_older_state_is_not_used(caplog: pytest.LogCaptureFixture) -> None:
    old = {"mean": torch.zeros(2, 4), "precision": torch.eye(4), "threshold": 1.0, "quantile": 0.99}
    assert ood.usable(old, "fold0/model.pt") is None
    assert "fold0/model.pt: out-of-distribution statistics of an older blendsign (version 1" in caplog.text
    assert ood.usable(None, "x") is None
    current = ood.fit([gaussian(200, 0)[0]], gaussian(200, 0)[1], gaussian(200, 0)[2])
    assert ood.usable(current, "x") is current


def test_conformal_quantile() -> None:
    scores = np.arange(1.0, 201.0)  # 200 scores: ⌈201 · 0.99⌉ = 199th smallest
    assert ood.conformal_quantile(scores, 0.99) == 199.0
    assert ood.conformal_quantile(scores[:50], 0.99) == 50.0  # too few for 0.99: the largest


@pytest.mark.slow
def test_a_registered_model_flags_real_ct_and_not_unseen_synthetic_slices(cohort: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """Trained on the synthetic cohort and logged as the served model: its own (slimmed) checkpoint keeps the
    OOD state, every scored slice gets ood_score = the state's score of its stage statistics, the flag is
    score > 1; pydicom's real head-CT slices stand out (one flagged, both above 95% of unseen synthetic slices) and at
    most 5% of unseen synthetic slices are flagged."""
    from blendsign import model_package
    from blendsign.config import load_preset, override
    from blendsign.data import SliceDataset, load_index, make_loader, split_index
    from blendsign.engine import predict
    from blendsign.ingest import ingest
    from blendsign.labels import fuse
    from blendsign.serving import DICOM_COLUMN, read_slice, to_model_input
    from blendsign.synth import synthesize
    from blendsign.tracking import Tracker
    from blendsign.train import train
    from tests.served import dicom_bytes

    cfg = override(load_preset("ci"), train={"epochs": 2})
    result = train(cfg, ingest_dir=cohort["ingest"], labels_dir=cohort["labels"], folds_dir=cohort["folds"], fold=0,
                   out_dir=tmp_path / "fold0", progress=False)
    checkpoint = result.out_dir / "model.pt"
    state = torch.load(checkpoint, weights_only=True)["ood"]
    assert state["quantile"] == ood.QUANTILE and len(state["stages"]) == 4  # resnet18: layer1 … layer4
    assert all(stage["threshold"] > 0 for stage in state["stages"])
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
        expected = ood.score(state, net(x, stage_stats=True)["stage_stats"]).numpy()
    np.testing.assert_allclose(out["ood_score"].astype(float).to_numpy(), expected, rtol=1e-4)
    assert out["out_of_distribution"].tolist() == (expected > 1).tolist()
    # what the flag is for: pydicom's real head-CT slices are not what it was trained on; synthetic slices it never
    # saw (its held-out fold, and a cohort of another seed) are
    _, held_out = split_index(cohort["ingest"], cohort["labels"], cohort["folds"], 0)
    other = tmp_path / "other"
    synthesize(other / "src", replace(cfg.synth, scans=12, seed=77), progress=False)
    ingest(other / "src" / "dicom", other / "ingest", cfg.ingest, progress=False)
    fuse(other / "src" / "annotations.csv", other / "ingest", other / "labels", cfg.labels)
    scores = []
    for index in (held_out, load_index(other / "ingest", other / "labels")):
        assert index is not None
        ds = SliceDataset(index, cfg.data, stride=net.stride, min_overlap=0.7, augment=False)
        pred = predict(net, make_loader(ds, batch_size=16, shuffle=False, workers=0, device=torch.device("cpu")),
                       device=torch.device("cpu"), progress=False, stats=True)
        scores.append(ood.score(state, [torch.from_numpy(s) for s in pred["stats"]]))
    unseen = torch.cat(scores)
    flagged = (unseen > 1).float()
    assert flagged.mean() <= 0.05, f"{int(flagged.sum())} of {len(flagged)} unseen synthetic slices flagged"
    # This two-epoch model is not bit-reproducible across thread counts: J2K_pixelrep_mismatch.dcm scored 0.95–1.35
    # over six runs (693_J2KI.dcm 1.66–2.52; the demo's model flags both, README). What holds in every run: one
    # real slice is flagged and both score above 95% of the unseen synthetic slices.
    real = torch.from_numpy(out["ood_score"].astype(float).to_numpy()).float()
    assert (real > 1).any() and (real > unseen.quantile(0.95)).all(), (real.tolist(), unseen.quantile(0.95).item())
