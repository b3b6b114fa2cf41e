"""blendsign.errors: one family of ValueErrors, and each module raises its kind (the CLI's rule for them: test_cli)."""

from __future__ import annotations

import pytest

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
