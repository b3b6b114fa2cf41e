"""blendsign.errors and the CLI's rule: our errors in one line, bugs with their traceback."""

from __future__ import annotations

import logging

import pytest

from blendsign import cli
from blendsign.config import load_preset
from blendsign.dicom import read_header
from blendsign.errors import BlendsignError, ConfigError, InputError, UnusableFileError


def test_every_error_is_a_value_error_of_the_family() -> None:
    for cls in (ConfigError, InputError, UnusableFileError):
        assert issubclass(cls, BlendsignError) and issubclass(cls, ValueError)


def test_modules_raise_their_kind(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")
    (tmp_path / "x.dcm").write_bytes(b"not dicom at all" * 16)
    with pytest.raises(UnusableFileError, match="not a DICOM file"):
        read_header(tmp_path / "x.dcm")


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
