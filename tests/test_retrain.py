"""blendsign.retrain: the input snapshot digest and the new-data decision against a real MLflow registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blendsign.registry import register_version
from blendsign.retrain import RETRAIN, SKIP, RetrainDecision, decide, read_decision, source_digest, write_decision
from blendsign.tracking import Tracker


def test_source_digest_follows_content_not_rewrites(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    (src / "a").mkdir(parents=True)
    (src / "a" / "1.dcm").write_bytes(b"one")
    ann = tmp_path / "annotations.csv"
    ann.write_text("x\n")
    first = source_digest(src, ann, "")
    (src / "a" / "1.dcm").write_bytes(b"one")  # rewritten, same bytes
    assert source_digest(src, ann, None) == first
    (src / "a" / "2.dcm").write_bytes(b"two")  # a new file under the prefix
    second = source_digest(src, ann)
    assert second != first
    ann.write_text("y\n")  # new labels
    assert source_digest(src, ann) != second
    with pytest.raises(FileNotFoundError):
        source_digest(tmp_path / "missing")


def _ingest(tmp_path: Path, fingerprint: str) -> Path:
    folder = tmp_path / f"ingest-{fingerprint}"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"dataset_fingerprint": fingerprint, "scans": []}))
    return folder


def _register(tracker: Tracker, name: str, fingerprint: str, value: float) -> str:
    with tracker.run("register") as run:
        pass
    tracker.client.create_model_version(name, source=f"runs:/{run.run_id}/model", run_id=run.run_id)
    version, _ = register_version(tracker.client, name=name, run_id=run.run_id, metric="cv_auc_blend_sign",
                                  value=value, margin=0.0, tags={"data_fingerprint": fingerprint}, card="")
    return version


def test_decision_against_the_champions_fingerprint(tmp_path: Path) -> None:
    tracker = Tracker.open("retrain", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, name = tracker.client, "blendsign-retrain"
    old, new = _ingest(tmp_path, "aaa"), _ingest(tmp_path, "bbb")

    first = decide(old, client=client, model_name=name)  # no registered model at all
    assert first.retrain and first.status == RETRAIN and "no champion" in first.reason

    client.create_registered_model(name)
    _register(tracker, name, "aaa", 0.8)
    same = decide(old, client=client, model_name=name)
    assert not same.retrain and same.status == SKIP
    assert same.champion_version == "1" and same.champion_fingerprint == "aaa" and "no new data" in same.reason
    forced = decide(old, client=client, model_name=name, only_if_new_data=False)
    assert forced.retrain and "unconditionally" in forced.reason
    changed = decide(new, client=client, model_name=name)
    assert changed.retrain and "new data" in changed.reason and changed.fingerprint == "bbb"

    # The new data trained a challenger that lost the gate: the next scheduled run does not repeat it.
    _register(tracker, name, "bbb", 0.7)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    again = decide(new, client=client, model_name=name)
    assert not again.retrain and "v2 of blendsign-retrain (challenger, not champion v1)" in again.reason


def test_decision_round_trips_and_reads_well(tmp_path: Path) -> None:
    d = RetrainDecision(False, "no new data since champion v3", "f" * 64, "blendsign", "3", "f" * 64)
    write_decision(d, tmp_path / "decision.json")
    assert read_decision(tmp_path / "decision.json") == d
    md = d.markdown()
    assert "# Retraining decision: skip" in md and "champion v3" in md
