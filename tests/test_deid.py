"""blendsign.deid: pseudonyms are HMAC-SHA256 of kind and identifier; the key comes from the environment or from one
key file beside the output, created once and readable by its owner only."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from blendsign.deid import KEY_ENV, Pseudonymizer, key_path_for, load_or_create_key
from blendsign.errors import ConfigError

KEY = b"0123456789abcdef"


def test_a_pseudonym_is_the_keyed_hash_of_kind_and_identifier() -> None:
    pz = Pseudonymizer(KEY)
    expected = hmac.new(KEY, b"patient\x00PID-0001", hashlib.sha256).hexdigest()[:24]
    assert pz.patient(" PID-0001\n") == expected  # surrounding whitespace is not part of the identifier
    assert len({pz.patient("1.2.3"), pz.scan("1.2.3"), pz.series("1.2.3"), pz.instance("1.2.3")}) == 4
    assert Pseudonymizer(b"another key, 16+ bytes").patient("PID-0001") != expected
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        Pseudonymizer(b"short")


def test_the_key_file_is_created_once_beside_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ingest"
    assert key_path_for(out) == tmp_path / "ingest.pseudonym-key"
    with pytest.raises(FileNotFoundError, match=KEY_ENV):
        load_or_create_key(out, create=False)
    first = load_or_create_key(out)
    assert key_path_for(out).stat().st_mode & 0o777 == 0o600 and not out.exists()
    assert load_or_create_key(out, create=False).fingerprint == first.fingerprint
    monkeypatch.setenv(KEY_ENV, KEY.decode())  # the environment wins, and no file is written for it
    assert load_or_create_key(tmp_path / "other") == Pseudonymizer(KEY)
    assert not key_path_for(tmp_path / "other").exists()
