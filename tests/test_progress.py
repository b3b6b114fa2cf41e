"""blendsign.progress: tqdm on a terminal, periodic plain log lines in a pod's log."""

from __future__ import annotations

import io
import logging

import pytest

from blendsign import progress as progress_module
from blendsign.progress import LogProgress, progress


def test_no_terminal_gives_plain_lines_not_carriage_returns(caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())  # a pod's log: not a terminal
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "0")  # a line per update
    with caplog.at_level(logging.INFO, logger="blendsign.progress"):
        bar = progress(range(4), desc="train fold 0", unit="batch")
        assert isinstance(bar, LogProgress)
        for _ in bar:
            bar.set_postfix(loss="0.5")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train fold 0: 1/4 batch (25%)") and "loss=0.5" in lines[0]
    assert lines[-1].startswith("train fold 0: 4/4 batch (100%)") and len(lines) == 5  # 4 updates + the close
    assert not any("\r" in line for line in lines)
    assert "\r" not in progress_module.sys.stderr.getvalue()  # no bar drawn


def test_lines_are_periodic_and_silence_is_silent(caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "3600")
    with caplog.at_level(logging.INFO, logger="blendsign.progress"):
        with progress(total=1000, desc="scans", unit="scan") as bar:
            for _ in range(1000):
                bar.update()
        assert [r.getMessage().split(",")[0] for r in caplog.records] == ["scans: 1000/1000 scan (100%)"]
        caplog.clear()
        for _ in progress(range(10), desc="quiet", enabled=False):
            pass
    assert caplog.records == []


def test_a_terminal_gets_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress_module.sys, "stderr", Tty())
    from tqdm import tqdm

    bar = progress(range(2), desc="x")
    assert isinstance(bar, tqdm)
    bar.close()
