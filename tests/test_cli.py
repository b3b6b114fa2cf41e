"""blendsign.cli: the command line's own rules (each command's wiring is tested beside its stage)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blendsign import cli
from blendsign.errors import InputError
from tests.conftest import BUCKET
from tests.test_ingest import make_study


def test_cli_reports_our_errors_in_one_line(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="blendsign"):
        rc = cli.main(["folds", "x", "y", "--config", "nope"])
    assert rc == 2
    assert [r.getMessage() for r in caplog.records] == [
        "unknown preset 'nope'; choose one of ['ci', 'demo', 'paper'] or a .toml file"]


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch) -> None:
    def broken(args: object) -> int:
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(cli, "_run_synth", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["synth", "out"])


def test_one_line_names_what_a_person_can_act_on() -> None:
    import botocore.exceptions
    import mlflow.exceptions

    assert cli.one_line(InputError("no annotations")) == "no annotations"
    assert cli.one_line(FileNotFoundError("config file x.toml not found")) == "config file x.toml not found"
    assert cli.one_line(botocore.exceptions.NoCredentialsError()) == "S3: Unable to locate credentials " \
        "(NoCredentialsError)"
    assert cli.one_line(mlflow.exceptions.MlflowException("no such run")).endswith("): no such run")
    assert cli.one_line(ValueError("bug")) is None and cli.one_line(KeyError("bug")) is None


def test_a_misspelt_bucket_is_one_line_from_the_cli(s3: Any, tmp_path: Path) -> None:
    # the command as a user runs it, in its own process: in-process, a log handler that an earlier test bound to
    # its since closed capture stream printed "--- Logging error ---" with a traceback here in one CI run of four
    proc = subprocess.run([sys.executable, "-m", "blendsign.cli", "ingest", f"s3://{BUCKET}-misspelt/raw/dicom/",
                           str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert proc.returncode == 2 and len(errors) == 1 and "NoSuchBucket" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_ingest_and_lazy_imports(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    from blendsign.cli import main

    make_study(tmp_path / "src", ct_writer)
    assert main(["ingest", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "ingest_report.json").read_text())["slices_written"] == 5
    assert main(["ingest", str(tmp_path / "nowhere"), str(tmp_path / "out2"), "--no-progress"]) == 2
    heavy = "('torch', 'mlflow', 'kfp', 'pyarrow')"
    code = f"import sys, blendsign.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
