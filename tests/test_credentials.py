"""blendsign.credentials: a mounted secret's keys exported before a step, values never logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from blendsign import credentials
from blendsign.pipeline import step


def _mounted(tmp_path: Path) -> Path:
    """A secret volume as the kubelet lays it out: a timestamped folder, ``..data`` and one link per key."""
    folder = tmp_path / "credentials"
    data = folder / "..2026_12_01_10_00_00.000000001"
    data.mkdir(parents=True)
    values = {"AWS_ACCESS_KEY_ID": "AKIAMOUNTED", "MLFLOW_TRACKING_URI": "http://mlflow.mlops:5000\n",
              "AWS_SESSION_TOKEN": "", "BLENDSIGN_PSEUDONYM_KEY": "mounted-key-0123", "NOT_OURS": "secret-value"}
    for key, value in values.items():
        (data / key).write_text(value)
    (folder / "..data").symlink_to(data.name)
    for key in values:
        (folder / key).symlink_to(Path("..data") / key)
    return folder


def test_the_known_keys_of_a_mounted_secret_become_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    folder = _mounted(tmp_path)
    for key in (*credentials.KEYS, "NOT_OURS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("BLENDSIGN_PSEUDONYM_KEY", "already-set")  # the environment wins
    with caplog.at_level(logging.INFO, logger="blendsign.credentials"):
        loaded = credentials.load(folder)
    assert loaded == ["AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_URI"]
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIAMOUNTED"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.mlops:5000"  # trailing newline stripped
    assert "AWS_SESSION_TOKEN" not in os.environ  # an empty key is no value
    assert os.environ["BLENDSIGN_PSEUDONYM_KEY"] == "already-set" and "NOT_OURS" not in os.environ
    assert "ignored keys: NOT_OURS" in caplog.text
    assert not any(v in caplog.text for v in ("AKIAMOUNTED", "mounted-key", "secret-value", "mlflow.mlops"))


def test_a_pipeline_step_loads_them_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _mounted(tmp_path)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv(credentials.DIR_ENV, str(folder))

    @step
    def probe() -> str | None:
        return os.environ.get("AWS_ACCESS_KEY_ID")

    assert probe() == "AKIAMOUNTED"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv(credentials.DIR_ENV)
    assert probe() is None and credentials.load() == []  # outside a pod: nothing to do
