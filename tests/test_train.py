"""blendsign.train: a tiny real run (loss falls, MLflow records it), resume equivalence, refusals, DDP on gloo."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blendsign import checkpoint
from blendsign.checkpoint import trained_on
from blendsign.config import load_preset, override
from blendsign.data import check_data, load_index, split_index, training_data
from blendsign.engine import resolve_device
from blendsign.tracking import Tracker
from blendsign.train import teacher_digest, train

CFG = load_preset("ci")


def _dirs(cohort: dict[str, Path]) -> dict[str, Path]:
    return {"ingest_dir": cohort["ingest"], "labels_dir": cohort["labels"], "folds_dir": cohort["folds"]}


def test_loss_falls_and_mlflow_records_the_run(cohort: dict[str, Path], tmp_path: Path) -> None:
    tracker = Tracker.open("test-train", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = override(CFG, train={"epochs": 4})
    result = train(cfg, **_dirs(cohort), fold=0, out_dir=tmp_path / "run", tracker=tracker, progress=False)
    losses = [h["loss_total"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.checkpoint.exists() and result.epochs == 4
    run = tracker.client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["loss.class_weights"] == "(1.0, 2.0, 20.0)"
    assert {"loss_cls", "loss_center", "loss_box", "lr", "images_per_s", "val_auc_non_ich",
            "val_sensitivity_blend_sign", "val_f1_normal_ich"} <= set(run.data.metrics)
    assert len(tracker.client.get_metric_history(result.run_id, "loss_total")) == 4
    artifacts = {a.path for a in tracker.client.list_artifacts(result.run_id)}
    assert {"checkpoint", "config.json", "history.json"} <= artifacts
    assert not [k for k in run.data.metrics if k.startswith("best")]  # no epoch is chosen on the held-out fold
    # the model is the final epoch's weights, without the optimiser state that last.pt keeps for resuming
    ckpt = checkpoint.load(result.checkpoint)
    last = checkpoint.load(tmp_path / "run" / "last.pt")
    assert ckpt["config"] == cfg.to_dict() and ckpt["epoch"] == 4 and ckpt["optimizer"] is None
    assert all(torch.equal(v, last["model"][k]) for k, v in ckpt["model"].items())
    assert result.held_out() == pytest.approx(result.history[-1]["val_auc_blend_sign"])


def test_resume_gives_the_uninterrupted_result(cohort: dict[str, Path], tmp_path: Path) -> None:
    full = train(CFG, **_dirs(cohort), fold=1, out_dir=tmp_path / "full", progress=False)
    # a run cut short after one of its two epochs
    train(CFG, **_dirs(cohort), fold=1, out_dir=tmp_path / "cut", stop_after_epochs=1, progress=False)
    assert not (tmp_path / "cut" / "model.pt").exists()  # unfinished: no model yet
    (tmp_path / "cut" / ".last.pt.4242.tmp").write_bytes(b"half a checkpoint of a killed run")
    with pytest.raises(ValueError, match="pass --resume"):
        train(CFG, **_dirs(cohort), fold=1, out_dir=tmp_path / "cut", progress=False)
    resumed = train(CFG, **_dirs(cohort), fold=1, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert not list((tmp_path / "cut").glob(".*.tmp"))  # the killed run's temporary is gone
    a = checkpoint.load(tmp_path / "full" / "last.pt")
    b = checkpoint.load(tmp_path / "cut" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [h["loss_total"] for h in full.history] == [h["loss_total"] for h in resumed.history]
    # re-running a finished run is a no-op; another configuration is refused
    again = train(CFG, **_dirs(cohort), fold=1, out_dir=tmp_path / "full", progress=False)
    assert again.history == full.history
    with pytest.raises(ValueError, match="different configuration"):
        train(override(CFG, train={"lr": 0.02}), **_dirs(cohort), fold=1, out_dir=tmp_path / "full", progress=False)
    # how it runs (loader workers, device) is not what is trained
    moved = train(override(CFG, data={"workers": 1}, train={"device": "cpu", "amp": False}), **_dirs(cohort),
                  fold=1, out_dir=tmp_path / "full", progress=False)
    assert moved.history == full.history
    # a copy that lost model.pt (a pod killed while uploading) gets it back from its finished last.pt
    model = checkpoint.load(tmp_path / "full" / "model.pt")["model"]
    (tmp_path / "full" / "model.pt").unlink()
    assert train(CFG, **_dirs(cohort), fold=1, out_dir=tmp_path / "full", progress=False).history == full.history
    rebuilt = checkpoint.load(tmp_path / "full" / "model.pt")
    assert rebuilt["optimizer"] is None and all(torch.equal(v, rebuilt["model"][k]) for k, v in model.items())


def test_a_model_of_other_data_or_another_teacher_is_trained_anew(cohort: dict[str, Path], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg, out = override(CFG, train={"epochs": 1}), tmp_path / "round1"
    n = len(split_index(cohort["ingest"], cohort["labels"], cohort["folds"], 0)[0])
    first = np.tile(np.float32([0.8, 0.15, 0.05]), (n, 1))
    second = first[:, ::-1].copy()
    train(cfg, **_dirs(cohort), fold=0, out_dir=out, teacher=first, progress=False)
    assert trained_on(out / "model.pt")["teacher"] == teacher_digest(first)
    train(cfg, **_dirs(cohort), fold=0, out_dir=out, teacher=first, progress=False)  # same teacher: reused
    assert "other soft labels" not in caplog.text
    train(cfg, **_dirs(cohort), fold=0, out_dir=out, teacher=second, progress=False)
    assert "other soft labels" in caplog.text
    assert trained_on(out / "model.pt")["teacher"] == teacher_digest(second)
    # another fold into the same folder: not the finished fold 0 handed back, but fold 1 trained there
    data = trained_on(out / "model.pt")["data"]
    again = train(cfg, **_dirs(cohort), fold=1, out_dir=out, progress=False)
    assert "other data, labels or folds" in caplog.text and again.fold == 1
    assert trained_on(out / "model.pt")["data"] == training_data(cfg, *_dirs(cohort).values(), 1)[2] != data


def test_refusals_say_why(cohort: dict[str, Path]) -> None:
    index = load_index(cohort["ingest"], cohort["labels"], cohort["folds"])
    no_blend = dataclasses.replace(index, label=np.minimum(index.label, 1))
    with pytest.raises(ValueError, match="blend_sign have no slice in the training folds of fold 2"):
        check_data(no_blend, index, 2)
    empty = dataclasses.replace(index, file=())
    with pytest.raises(ValueError, match="fold 0 is empty"):
        check_data(index, empty, 0)
    with pytest.raises(ValueError, match="fold 7 does not exist"):
        train(CFG, **_dirs(cohort), fold=7, out_dir=Path("unused"), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.slow
def test_ddp_on_gloo_with_two_processes(cohort: dict[str, Path], tmp_path: Path) -> None:
    """The same CLI entry point under torchrun: two CPU processes, gloo backend."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "blendsign.cli", "train", "--config", "ci", "--epochs", "1", "--no-mlflow", "--no-progress",
           "--ingest", str(cohort["ingest"]), "--labels", str(cohort["labels"]), "--folds", str(cohort["folds"]),
           "--fold", "0", "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = checkpoint.load(tmp_path / "ddp" / "last.pt")
    assert ckpt["epoch"] == 1 and "module." not in next(iter(ckpt["model"]))


def test_optimizer_is_the_papers_sgd_unless_a_preset_asks_for_adamw() -> None:
    from blendsign.train import make_optimizer

    net = torch.nn.Linear(2, 2)
    paper = load_preset("paper")
    sgd = make_optimizer(net, paper)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["lr"] == 0.01 and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    adamw = make_optimizer(net, override(paper, train={"optimizer": "adamw", "lr": 1e-3}))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match=r"train\.optimizer must be 'sgd' or 'adamw', got 'adam'"):
        make_optimizer(net, override(paper, train={"optimizer": "adam"}))


def test_a_checkpoint_written_before_a_field_existed_still_matches_its_default() -> None:
    from blendsign.train import _training_part

    cfg = load_preset("ci")
    old = cfg.to_dict()
    del old["train"]["torch_compile"]  # a field added on 2026-12-03: a checkpoint of the day before lacks it
    assert _training_part(old) == _training_part(cfg.to_dict())
    assert _training_part(override(cfg, train={"lr": 0.5}).to_dict()) != _training_part(cfg.to_dict())
