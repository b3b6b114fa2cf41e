"""blendsign.distill: a round of self-knowledge distillation end to end; the review table; label noise; the final
models exported and gathered (``distill.json``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blendsign.config import load_preset, override
from blendsign.data import inject_label_noise, load_index, split_index
from blendsign.distill import DistillResult, distill, export_final, final_checkpoint, gather, review_table, soft_labels
from blendsign.engine import resolve_device
from blendsign.folds import fold_ids
from blendsign.pipeline import REFIT, training_jobs
from blendsign.tracking import Tracker

CFG = override(load_preset("ci"), train={"epochs": 1}, distill={"rounds": 1})


def test_one_round_end_to_end(cohort: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = Tracker.open("test-distill", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    dirs = {"ingest_dir": cohort["ingest"], "labels_dir": cohort["labels"], "folds_dir": cohort["folds"]}
    result = distill(CFG, **dirs, fold=0, out_dir=tmp_path / "models", tracker=tracker, progress=False)
    assert len(result.rounds) == 2
    fold_dir = tmp_path / "models" / "fold0"
    assert final_checkpoint(fold_dir) == fold_dir / "round1" / "model.pt"
    # the student learned from the teacher's soft labels on the training slices, evaluation preprocessing
    train_index, _ = split_index(cohort["ingest"], cohort["labels"], cohort["folds"], 0)
    soft = pq.read_table(fold_dir / "round1" / "soft_labels.parquet").to_pandas()
    assert len(soft) == len(train_index) and list(soft["instance_key"]) == list(train_index.instance_key)
    probs = soft[["p_non_ich", "p_normal_ich", "p_blend_sign"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    again = soft_labels(fold_dir / "round0" / "model.pt", train_index, CFG, resolve_device("cpu"), progress=False)
    np.testing.assert_allclose(probs, again, rtol=1e-5, atol=1e-6)
    # preprocessing follows the checkpoint, whatever the caller's config says
    resized = override(CFG, data={"size": 32})
    np.testing.assert_allclose(soft_labels(fold_dir / "round0" / "model.pt", train_index, resized,
                                           resolve_device("cpu"), progress=False), again, rtol=1e-5, atol=1e-6)
    review = (fold_dir / "round1" / "review.csv").read_text().splitlines()
    assert review[0].startswith("scan_id,slice_index,instance_key,label,teacher_says,p_label")
    assert len(review) == 1 + CFG.distill.review_top
    # MLflow: fold run → round runs nested under it, soft labels logged with the student
    fold_run = tracker.client.get_run(result.fold_run_id)
    rounds = [tracker.client.get_run(r.run_id) for r in result.rounds]
    assert all(r.data.tags["mlflow.parentRunId"] == fold_run.info.run_id for r in rounds)
    assert [r.data.tags["round"] for r in rounds] == ["0", "1"]
    logged = {a.path for a in tracker.client.list_artifacts(rounds[1].info.run_id, "distillation")}
    assert {"distillation/soft_labels.parquet", "distillation/review.md"} <= logged
    # idempotent: a second call trains nothing and keeps the fold run
    again_result = distill(CFG, **dirs, fold=0, out_dir=tmp_path / "models", tracker=tracker, progress=False)
    assert again_result.fold_run_id == result.fold_run_id
    assert [r.history for r in again_result.rounds] == [r.history for r in result.rounds]
    _a_retried_job_keeps_its_fold_run_and_its_soft_labels(tracker, dirs, tmp_path, result, monkeypatch)


def _a_retried_job_keeps_its_fold_run_and_its_soft_labels(tracker: Tracker, dirs: dict[str, Path], tmp_path: Path,
                                                          first: DistillResult, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    """A pod killed before the distillation ended (no distill.json yet) and retried on another device: the
    fold run is the same one, and the student round is taught by the saved soft labels (recomputed ones could
    differ in the last bit on another device and restart the round)."""
    import blendsign.distill as distill_module

    fold_dir = tmp_path / "models" / "fold0"
    (fold_dir / "distill.json").unlink()  # as if the pod died just before writing it

    def no_prediction(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the teacher predicted again instead of reusing the round's soft labels")

    with monkeypatch.context() as mp:
        mp.setattr(distill_module, "soft_labels", no_prediction)
        again = distill(CFG, **dirs, fold=0, out_dir=tmp_path / "models", tracker=tracker, progress=False)
    assert again.fold_run_id == first.fold_run_id
    assert [r.run_id for r in again.rounds] == [r.run_id for r in first.rounds]  # nothing retrained
    folds = tracker.client.search_runs([tracker.experiment_id], filter_string="tags.stage = 'fold'")
    assert len(folds) == 1
    train_index = split_index(dirs["ingest_dir"], dirs["labels_dir"], dirs["folds_dir"], 0)[0]
    saved = distill_module._saved_soft_labels(fold_dir / "round1", fold_dir / "round0" / "model.pt", train_index)
    assert saved is not None and saved.dtype == np.float32 and saved.shape == (len(train_index), 3)
    (fold_dir / "round0" / "model.pt").write_bytes(b"another teacher")  # the teacher changed: labels recomputed
    assert distill_module._saved_soft_labels(fold_dir / "round1", fold_dir / "round0" / "model.pt", train_index) \
        is None


def test_review_table_orders_by_teacher_disbelief(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    index = dataclasses.replace(index, label=np.zeros(len(index), dtype=np.int64))  # everything "non_ich"
    soft = np.tile([0.9, 0.05, 0.05], (len(index), 1))
    soft[3] = [0.1, 0.2, 0.7]  # the teacher is sure slice 3 is a blend sign
    soft[5] = [0.4, 0.5, 0.1]
    rows = review_table(index, soft, top=2)
    assert [r["instance_key"] for r in rows] == [index.instance_key[3], index.instance_key[5]]
    assert rows[0]["teacher_says"] == "blend_sign" and rows[0]["p_label"] == pytest.approx(0.1)


def test_label_noise_flips_only_blend_sign(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    noisy = inject_label_noise(index, 0.5, seed=0)
    blend = index.label == 2
    assert noisy.noisy is not None and noisy.noisy.sum() == round(0.5 * blend.sum())
    assert np.all(noisy.label[noisy.noisy] == 1) and np.all(blend[noisy.noisy])
    assert np.array_equal(noisy.label[~noisy.noisy], index.label[~noisy.noisy])
    assert np.array_equal(inject_label_noise(index, 0.5, seed=0).noisy, noisy.noisy)


def _distilled(folder: Path, name: str, rounds: int) -> Path:
    fold_dir = folder / name
    for r in range(rounds + 1):
        (fold_dir / f"round{r}").mkdir(parents=True)
        (fold_dir / f"round{r}" / "model.pt").write_bytes(b"%s r%d" % (name.encode(), r))
        (fold_dir / f"round{r}" / "last.pt").write_bytes(b"optimiser state")
    (fold_dir / "distill.json").write_text(json.dumps({"fold": name, "final_checkpoint": f"round{rounds}/model.pt"}))
    return fold_dir


def test_folds_jobs_and_the_exported_final_models(tmp_path: Path) -> None:
    pq.write_table(pa.table({"scan_id": ["a", "b", "c", "d"], "fold": [2, 0, 2, 1]}), tmp_path / "folds.parquet")
    assert fold_ids(tmp_path) == [0, 1, 2]
    assert training_jobs(tmp_path, "refit") == [0, 1, 2, REFIT]  # the refit trains beside the folds
    assert training_jobs(tmp_path, "fold-ensemble") == [0, 1, 2]
    sources = [_distilled(tmp_path / f"task{k}", f"fold{k}", 1).parent for k in (1, 0)]
    dest = gather(sources, tmp_path / "cv" / "models")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["fold0/distill.json", "fold0/round1/model.pt", "fold1/distill.json", "fold1/round1/model.pt"]
    assert gather(sources, tmp_path / "cv" / "models") == dest  # a re-run: the same files again
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == files
    with pytest.raises(ValueError, match="twice"):
        gather([sources[0], sources[0]], tmp_path / "again")
    with pytest.raises(FileNotFoundError, match="no finished training job fold2"):
        gather(sources, tmp_path / "none", names=["fold0", "fold2"])
    refit = _distilled(tmp_path / "task-refit", "all", 0).parent
    assert sorted(p.name for p in gather([*sources, refit], tmp_path / "eval").iterdir()) == ["fold0", "fold1"]
    only = gather([*sources, refit], tmp_path / "register", names=["all"])
    assert (only / "all" / "round0" / "model.pt").read_bytes() == b"all r0" and not (only / "fold0").exists()


def test_an_export_replaces_the_teachers(tmp_path: Path) -> None:
    teacher = _distilled(tmp_path / "teacher", "fold3", 0)
    export_final(teacher, tmp_path / "models")
    assert (tmp_path / "models" / "fold3" / "round0" / "model.pt").is_file()
    student = _distilled(tmp_path / "student", "fold3", 2)
    target = export_final(student, tmp_path / "models")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "distill.json", "round2/model.pt"]  # no earlier round, no optimiser state


def test_a_student_starts_from_its_teacher_when_asked(cohort: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from blendsign import checkpoint
    from blendsign.model import build_model
    from blendsign.storage import file_sha256
    from blendsign.train import train

    dirs = {"ingest_dir": cohort["ingest"], "labels_dir": cohort["labels"], "folds_dir": cohort["folds"]}
    # with a learning rate of 0 a model keeps the weights it starts from: the given checkpoint's, not the init's
    still = override(CFG, train={"lr": 0.0})
    start = tmp_path / "start.pt"
    torch.manual_seed(1)
    checkpoint.save({"model": build_model(still.model).state_dict()}, start)
    for init, out in ((start, "from-start"), (None, "fresh")):
        train(still, **dirs, fold=0, out_dir=tmp_path / out, init_from=init, progress=False)
    weights = {out: checkpoint.load(tmp_path / out / "model.pt")["model"] for out in ("from-start", "fresh")}
    given = checkpoint.read_state_dict(start)
    conv = "backbone.layer1.0.conv1.weight"
    assert torch.equal(weights["from-start"][conv], given[conv])
    assert not torch.equal(weights["fresh"][conv], given[conv])
    assert checkpoint.trained_on(tmp_path / "from-start" / "model.pt")["init"] == file_sha256(start)
    assert "init" not in checkpoint.trained_on(tmp_path / "fresh" / "model.pt")
    # distill: the student of round 1 starts from round 0's final model
    warm = override(CFG, distill={"student_init": "teacher"})
    distill(warm, **dirs, fold=0, out_dir=tmp_path / "models", progress=False)
    fold_dir = tmp_path / "models" / "fold0"
    teacher = fold_dir / "round0" / "model.pt"
    assert checkpoint.trained_on(fold_dir / "round1" / "model.pt")["init"] == file_sha256(teacher)
    with pytest.raises(ValueError, match=r"distill\.student_init must be one of \['backbone', 'teacher'\]"):
        override(CFG, distill={"student_init": "scratch"})


def test_only_the_last_round_fits_the_out_of_distribution_statistics(cohort: dict[str, Path], tmp_path: Path) -> None:
    from blendsign import checkpoint

    dirs = {"ingest_dir": cohort["ingest"], "labels_dir": cohort["labels"], "folds_dir": cohort["folds"]}
    fold_dir = tmp_path / "models" / "fold0"
    distill(CFG, **dirs, fold=0, out_dir=tmp_path / "models", rounds=0, progress=False)  # the pipeline's teacher step
    assert checkpoint.ood_state(fold_dir / "round0" / "model.pt") is None  # a teacher on its way to a student
    distill(CFG, **dirs, fold=0, out_dir=tmp_path / "models", progress=False)
    assert checkpoint.ood_state(fold_dir / "round0" / "model.pt") is None
    assert checkpoint.ood_state(fold_dir / "round1" / "model.pt") is not None
    # the same teacher as a run's final model (no students): its statistics are fitted then, nothing retrained
    teacher_only = override(CFG, distill={"rounds": 0})
    result = distill(teacher_only, **dirs, fold=0, out_dir=tmp_path / "models", progress=False)
    assert checkpoint.ood_state(fold_dir / "round0" / "model.pt") is not None
    assert result.final.checkpoint == fold_dir / "round0" / "model.pt" and len(result.rounds) == 1
