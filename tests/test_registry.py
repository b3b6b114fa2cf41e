"""blendsign.registry: the champion gate (pure and against a real MLflow registry) and the model card."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from blendsign import CLASSES
from blendsign.config import load_preset
from blendsign.metrics import per_class_metrics
from blendsign.pipeline import run_pipeline
from blendsign.registry import PROMOTION_METRICS, check_promotion_metric, decide, model_card, register_version
from blendsign.tracking import Tracker


@pytest.mark.parametrize(
    ("new", "champion", "margin", "promoted"),
    [(0.8, None, 0.0, True), (0.81, 0.80, 0.0, True), (0.80, 0.80, 0.0, False), (0.805, 0.80, 0.01, False),
     (0.82, 0.80, 0.01, True), (math.nan, None, 0.0, False), (math.nan, 0.5, 0.0, False)],
)
def test_gate(new: float, champion: float | None, margin: float, promoted: bool) -> None:
    p = decide(new, champion, metric="cv_auc_blend_sign", margin=margin, champion_version="3" if champion else None)
    assert p.promoted is promoted
    assert ("promoted" if promoted else "") in p.text


def test_promotion_metrics_are_what_evaluation_computes() -> None:
    probs = np.eye(3)[[0, 1, 2, 0]]
    computed = {f"cv_{k}" for k in per_class_metrics(probs, np.array([0, 1, 2, 1]))}
    assert computed == set(PROMOTION_METRICS)
    assert check_promotion_metric("cv_f1_normal_ich") == "cv_f1_normal_ich"
    with pytest.raises(ValueError, match="unknown; choose cv_<metric>_<class>"):
        check_promotion_metric("auc_blend_sign")


def test_run_refuses_annotations_without_their_source(tmp_path: Path) -> None:
    tracker = Tracker.open("t", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ValueError, match="together, or neither"):
        run_pipeline(load_preset("ci"), work_dir=tmp_path / "w", annotations=tmp_path / "a.csv", tracker=tracker)
    with pytest.raises(ValueError, match="promotion metric"):
        run_pipeline(load_preset("ci"), work_dir=tmp_path / "w", tracker=tracker, metric="cv_auc")
    assert not (tmp_path / "w").exists()


def _version(tracker: Tracker, name: str) -> str:
    with tracker.run("register") as run:
        pass
    tracker.client.create_model_version(name, source=f"runs:/{run.run_id}/model", run_id=run.run_id)
    return run.run_id


def test_aliases_follow_the_gate_in_a_real_registry(tmp_path: Path) -> None:
    tracker = Tracker.open("test-registry", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, name, metric = tracker.client, "blendsign-test", "cv_auc_blend_sign"
    client.create_registered_model(name)
    v1, p1 = register_version(client, name=name, run_id=_version(tracker, name), metric=metric, value=0.80,
                              margin=0.0, tags={"data_fingerprint": "abc"}, card="card 1")
    v2, p2 = register_version(client, name=name, run_id=_version(tracker, name), metric=metric, value=0.75,
                              margin=0.0, tags={}, card="card 2")
    v3, p3 = register_version(client, name=name, run_id=_version(tracker, name), metric=metric, value=0.90,
                              margin=0.05, tags={}, card="card 3")
    assert (p1.promoted, p2.promoted, p3.promoted) == (True, False, True)
    assert client.get_model_version_by_alias(name, "champion").version == v3
    assert client.get_model_version_by_alias(name, "challenger").version == v2
    second = client.get_model_version(name, v2)
    assert second.tags[metric] == "0.750000" and "does not beat champion v1" in second.tags["promotion"]
    assert client.get_model_version(name, v1).tags["data_fingerprint"] == "abc"
    assert client.get_model_version(name, v3).description == "card 3"
    with pytest.raises(ValueError, match="no version"):
        register_version(client, name=name, run_id="0" * 32, metric=metric, value=1.0, margin=0.0, tags={}, card="")


def test_model_card_says_what_a_reader_needs() -> None:
    cv = {f"{m}_{c}": (0.9, 0.01) for m in ("sensitivity", "specificity", "f1", "auc") for c in CLASSES}
    metrics = {"cv": cv, "ci": {k: (0.85, 0.95) for k in cv}, "scan": {"auc_any_ich": 0.97}, "per_fold": {0: {}}}
    agreement = {"readers": 3, "fleiss_kappa": {"blend_sign": 0.79}, "gold_counts": {"blend_sign": 447}}
    card = model_card(name="blendsign", version="4", mode="refit", preset="paper", metrics=metrics,
                      agreement=agreement,
                      ingest={"scans_written": 1614, "slices_written": 13276, "excluded": {"postoperative": 65}},
                      fingerprint="f00d", commit="c0ffee", promotion=decide(0.9, None, metric="m", margin=0,
                                                                           champion_version=None),
                      command="blendsign run")
    needles = ("## Intended use", "## Limitations", "Asian population", "prevalence", "0.900 ± 0.010 [0.850, 0.950]",
               "f00d", "blend_sign 0.79", "postoperative 65", "promoted: first champion", "blendsign run")
    for needle in needles:
        assert needle in card, needle
