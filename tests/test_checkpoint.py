"""blendsign.checkpoint: the one reader and writer of the checkpoint format."""

from __future__ import annotations

import pytest
import torch

from blendsign import checkpoint
from blendsign.config import Config, load_preset
from blendsign.errors import InputError


def _state(**extra: object) -> dict[str, object]:
    cfg = load_preset("ci")
    return {"format": checkpoint.FORMAT, "model": {"w": torch.arange(4.0)}, "config": cfg.to_dict(), "fold": 1,
            "epoch": 2, "optimizer": {"state": {}}, "scheduler": {"last_epoch": 7}, "scaler": {}, "history": [
                {"loss_total": 0.5}], "run_id": "r", "trained_on": {"data": "d", "teacher": None},
            "ood": {"mean": torch.zeros(3, 2), "threshold": 1.5}, **extra}


class Code:
    """Pickled as a class reference: not tensors and plain data."""


def test_round_trip_and_the_resume_only_keys(tmp_path) -> None:
    checkpoint.save(_state(), tmp_path / checkpoint.LAST)
    state = checkpoint.load(tmp_path / checkpoint.LAST)
    assert torch.equal(state["model"]["w"], torch.arange(4.0)) and state["scheduler"] == {"last_epoch": 7}
    assert checkpoint.config_of(state) == load_preset("ci")
    model_only = checkpoint.model_only(state)
    assert [model_only[k] for k in checkpoint.RESUME_ONLY] == [None, None, None] and model_only["history"]
    assert checkpoint.trained_on(tmp_path / checkpoint.LAST) == {"data": "d", "teacher": None}
    assert checkpoint.ood_state(tmp_path / checkpoint.LAST)["threshold"] == 1.5
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left


def test_slim_copy_keeps_what_serving_needs(tmp_path) -> None:
    checkpoint.save(_state(), tmp_path / "model.pt")
    cfg = checkpoint.write_slim(tmp_path / "model.pt", tmp_path / "fold1.pt")
    slim = checkpoint.load(tmp_path / "fold1.pt")
    assert sorted(slim) == sorted(checkpoint.SERVED) and isinstance(cfg, Config) and slim["fold"] == 1
    assert torch.equal(slim["ood"]["mean"], torch.zeros(3, 2))


def test_refuses_what_is_not_a_checkpoint(tmp_path) -> None:
    torch.save({"model": {}}, tmp_path / "no_config.pt")
    with pytest.raises(InputError, match="needs keys 'model' and 'config'"):
        checkpoint.load(tmp_path / "no_config.pt")
    torch.save({**_state(), "extra": Code()}, tmp_path / "code.pt")
    with pytest.raises(InputError, match="not a readable checkpoint"):  # weights_only: no pickled classes
        checkpoint.load(tmp_path / "code.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "cut.pt")


def test_weights_files_plain_or_inside_a_checkpoint(tmp_path) -> None:
    torch.save({"conv.weight": torch.ones(2)}, tmp_path / "plain.pt")
    checkpoint.save(_state(), tmp_path / "ckpt.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    assert list(checkpoint.read_state_dict(tmp_path / "plain.pt")) == ["conv.weight"]
    assert list(checkpoint.read_state_dict(tmp_path / "ckpt.pt")) == ["w"]
    with pytest.raises(InputError, match="does not hold a state dict"):
        checkpoint.read_state_dict(tmp_path / "list.pt")
