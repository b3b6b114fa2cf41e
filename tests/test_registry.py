"""blendsign.registry: the champion gate (pure and against a real MLflow registry) and the model card."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blendsign import CLASSES
from blendsign.config import load_preset
from blendsign.metrics import per_class_metrics
from blendsign.pipeline import run_pipeline
from blendsign.registry import (
    PROMOTION_METRICS,
    baseline_verdict,
    check_promotion_metric,
    decide,
    model_card,
    prepare,
    publish,
    register_version,
    rollback,
)
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
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v2
    second = client.get_model_version(name, v2)
    assert second.tags[metric] == "0.750000" and "does not beat champion v1" in second.tags["promotion"]
    assert second.tags["promotion"].endswith("(cross-validated, each version on the data it was trained with)")
    assert client.get_model_version(name, v1).tags["data_fingerprint"] == "abc"
    assert client.get_model_version(name, v3).description == "card 3"
    with pytest.raises(ValueError, match="no version"):
        register_version(client, name=name, run_id="0" * 32, metric=metric, value=1.0, margin=0.0, tags={}, card="")


def _registry(tmp_path: Path, client_class: type | None = None) -> tuple[Tracker, Any, str, str]:
    tracker = Tracker.open("test-registry", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = tracker.client if client_class is None else client_class(tracking_uri=tracker.uri)
    client.create_registered_model("blendsign-test")
    return tracker, client, "blendsign-test", "cv_auc_blend_sign"


def test_two_registrations_interleaved_leave_the_better_model_champion(tmp_path: Path) -> None:
    """A decides against "no champion"; B registers and becomes champion; A then publishes: A must not take over
    from B on a comparison it never made, and says so."""
    tracker, client, name, metric = _registry(tmp_path)
    a = prepare(client, name=name, run_id=_version(tracker, name), metric=metric, value=0.70, margin=0.0)
    b_version, b = register_version(client, name=name, run_id=_version(tracker, name), metric=metric, value=0.90,
                                    margin=0.0, tags={}, card="card b")
    assert a.promotion.promoted and b.promoted  # each alone would be champion
    final = publish(client, a, tags={"data_fingerprint": "aaa"}, card=lambda p: f"card a: {p.text}")
    assert not final.promoted and "champion changed from none to v2 during this registration" in final.text
    assert str(client.get_model_version_by_alias(name, "champion").version) == b_version
    assert str(client.get_model_version_by_alias(name, "challenger").version) == a.version
    stored = client.get_model_version(name, a.version)
    assert stored.tags["promotion"] == final.text and stored.description == f"card a: {final.text}"


def test_a_concurrent_token_write_makes_the_promotion_refuse(tmp_path: Path) -> None:
    """Two writers pass the re-read at the same moment: the one whose token is not read back does not promote."""
    from mlflow import MlflowClient

    class Racing(MlflowClient):  # a real client; another registration writes its token right after ours
        def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
            super().set_registered_model_tag(name, key, value)
            if key == "champion_token":
                super().set_registered_model_tag(name, key, "v9-from-another-registration")

    tracker, client, name, metric = _registry(tmp_path, Racing)
    version, promotion = register_version(client, name=name, run_id=_version(tracker, name), metric=metric,
                                          value=0.9, margin=0.0, tags={}, card=lambda v, p: p.text)
    assert not promotion.promoted and "another registration wrote the champion token" in promotion.text
    assert str(client.get_model_version_by_alias(name, "challenger").version) == version
    assert client.get_model_version(name, version).description == promotion.text


def test_the_alias_moves_last_so_a_failed_registration_leaves_no_half_state(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from blendsign.retrain import decide as retrain_decide

    class FailingAlias(MlflowClient):
        def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
            raise MlflowException("registry unavailable")

    tracker, client, name, metric = _registry(tmp_path, FailingAlias)
    with pytest.raises(MlflowException):
        register_version(client, name=name, run_id=_version(tracker, name), metric=metric, value=0.9, margin=0.0,
                         tags={"data_fingerprint": "aaa"}, card="card")
    stored = tracker.client.get_model_version(name, "1")
    assert stored.tags["data_fingerprint"] == "aaa" and stored.description == "card"  # every tag came first
    with pytest.raises(MlflowException):
        tracker.client.get_model_version_by_alias(name, "champion")
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    (ingest / "manifest.json").write_text(json.dumps({"dataset_fingerprint": "aaa", "scans": []}))
    again = retrain_decide(ingest, client=tracker.client, model_name=name)
    assert again.retrain  # the unfinished version does not make the next scheduled run skip


def test_rollback_moves_the_champion_back_and_back_again(tmp_path: Path) -> None:
    tracker, client, name, metric = _registry(tmp_path)
    with pytest.raises(ValueError, match="no 'previous-champion' and 'champion' to roll back between"):
        rollback(client, name)
    v1, _ = register_version(client, name=name, run_id=_version(tracker, name), metric=metric, value=0.8,
                             margin=0.0, tags={}, card="1")
    v2, p2 = register_version(client, name=name, run_id=_version(tracker, name), metric=metric, value=0.9,
                              margin=0.0, tags={}, card="2")
    assert p2.promoted and str(client.get_model_version_by_alias(name, "previous-champion").version) == v1
    assert rollback(client, name) == (v1, v2)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == v2
    assert client.get_model_version(name, v2).tags["rolled_back"] == "champion v2 rolled back to v1"
    assert rollback(client, name) == (v2, v1)  # undone
    assert rollback(client, name) == (v1, v2)
    # The gate compares the next version with the champion after the rollback (v1 at 0.80, not v2 at 0.90).
    v3, p3 = register_version(client, name=name, run_id=_version(tracker, name), metric=metric, value=0.85,
                              margin=0.0, tags={}, card="3")
    assert p3.promoted and "beats champion v1" in p3.text
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == v1


def test_a_model_no_better_than_a_trivial_one_is_rejected_even_as_the_first_version(tmp_path: Path) -> None:
    """The demo's old champion: normal ICH AUC below chance and accuracy under "always non-ICH". It is rejected,
    named by the failing metrics, and gets no alias, although no champion exists; a good version then becomes
    the first champion."""
    tracker = Tracker.open("test-reject", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, name = tracker.client, "blendsign-reject"
    client.create_registered_model(name)
    bad = {"cv": {"auc_non_ich": [0.71, 0.1], "auc_normal_ich": [0.425, 0.155], "auc_blend_sign": [0.97, 0.0],
                  "accuracy": [0.29, 0.05]},
           "baselines": {"prior": {"cv": {"accuracy": [0.71, 0.02], "auc_normal_ich": [0.5, 0.0]}}}}
    refusals = baseline_verdict(bad, 0.05)
    assert refusals == ["cv_auc_normal_ich 0.4250 does not beat the no-skill baseline (0.5) by more than 0.05",
                        "cv_accuracy 0.2900 is below always answering the majority class (0.7100)"]
    v1, p1 = register_version(client, name=name, run_id=_version(tracker, name), metric="cv_auc_blend_sign",
                              value=0.97, margin=0.0, tags={}, card=lambda v, d: d.text, refusals=refusals)
    assert p1.rejected and not p1.promoted and p1.alias is None
    assert client.get_registered_model(name).aliases == {}
    version = client.get_model_version(name, v1)
    assert version.tags["rejected"] == "true" and "cv_auc_normal_ich 0.4250" in version.tags["promotion"]
    assert version.description.startswith("rejected: no better than a trivial model")
    good = {**bad, "cv": {**bad["cv"], "auc_normal_ich": [0.9, 0.0], "accuracy": [0.8, 0.0]}}
    assert baseline_verdict(good, 0.05) == []
    v2, p2 = register_version(client, name=name, run_id=_version(tracker, name), metric="cv_auc_blend_sign",
                              value=0.96, margin=0.0, tags={}, card="card", refusals=baseline_verdict(good, 0.05))
    assert p2.promoted and "first champion" in p2.text
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2


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
               "f00d", "blend_sign 0.79", "postoperative 65", "promoted: first champion", "blendsign run",
               "Trained with preset `paper` on the dataset above", "`out_of_distribution`")
    for needle in needles:
        assert needle in card, needle
    assert "## Against trivial baselines" not in card  # an evaluation from before the baselines
    metrics["baselines"] = {"prior": {"cv": {"accuracy": (0.7, 0.0), "auc_non_ich": (0.5, 0.0)}}}
    demo = model_card(name="blendsign", version="5", mode="refit", preset="demo", metrics=metrics,
                      agreement=agreement, ingest={}, fingerprint="f00d", commit="c0ffee",
                      promotion=decide(0.9, None, metric="m", margin=0, champion_version=None), command="x")
    assert "## Against trivial baselines" in demo and "| prior | 0.700 | 0.500 |" in demo
    assert "made for the embedded synthetic cohort" in demo and "never seen a real CT" in demo
