"""Pseudonyms: keyed hashes (HMAC-SHA256) of DICOM identifiers.

The key comes from ``BLENDSIGN_PSEUDONYM_KEY`` or from a key file created once beside the output
(``<OUT>.pseudonym-key``), never from the dataset. The same key maps the annotation UIDs later, so
``fuse`` can join readers' annotations to ingested slices without any original UID in the data.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from blendsign.errors import ConfigError
from blendsign.storage import atomic_path

log = logging.getLogger(__name__)

KEY_ENV = "BLENDSIGN_PSEUDONYM_KEY"
KEY_SUFFIX = ".pseudonym-key"
_DIGEST_CHARS = 24  # 96 bits: collision-free for any realistic cohort


@dataclass(frozen=True)
class Pseudonymizer:
    """Maps identifiers to stable pseudonyms under one secret key."""

    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ConfigError("pseudonym key must be at least 16 bytes")

    def _hash(self, kind: str, value: str) -> str:
        msg = f"{kind}\x00{value.strip()}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()[:_DIGEST_CHARS]

    def patient(self, patient_id: str) -> str:
        return self._hash("patient", patient_id)

    def scan(self, study_instance_uid: str) -> str:
        return self._hash("study", study_instance_uid)

    def series(self, series_instance_uid: str) -> str:
        return self._hash("series", series_instance_uid)

    def instance(self, sop_instance_uid: str) -> str:
        return self._hash("instance", sop_instance_uid)

    def file(self, relative_path: str) -> str:
        return self._hash("file", relative_path)

    @property
    def fingerprint(self) -> str:
        """A public fingerprint of the key, to check that two stages used the same one."""
        return self._hash("fingerprint", "blendsign")[:12]


def key_path_for(output: str | Path) -> Path:
    """The key file that belongs beside an output folder: ``<OUT>.pseudonym-key``."""
    out = Path(output)
    return out.with_name(out.name + KEY_SUFFIX)


def load_or_create_key(output: str | Path, *, create: bool = True) -> Pseudonymizer:
    """The pseudonymizer for ``output``: env key if set, else the key file beside it (created once)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Pseudonymizer(env.encode())
    path = key_path_for(output)
    if path.exists():
        return Pseudonymizer(path.read_bytes().strip())
    if not create:
        raise FileNotFoundError(
            f"no pseudonym key: set {KEY_ENV} or provide the key file {path} written by `blendsign ingest`"
        )
    key = secrets.token_hex(32).encode()
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owner-only from the first byte
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    log.info("created pseudonym key file %s (keep it secret; it is not part of the dataset)", path)
    return Pseudonymizer(key)
