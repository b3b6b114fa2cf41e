"""Scheduled retraining: what changed since the registered champion, decided before any training.

Two checks, both cheap:

- :func:`source_digest` — a digest of what lies under the input URIs (``s3://`` prefixes by key, size and
  ETag; local folders by relative path, size and content hash). The Kubeflow pipeline passes it to the ingest
  step as an input, so ingestion's cache key changes exactly when the data under the prefix changes.
- :func:`decide` — after ingestion: the dataset fingerprint (``manifest.json``) against the
  ``data_fingerprint`` tag of the registered model's ``champion`` version (and of its ``challenger`` and
  ``previous-champion``, already trained on exactly this data). Same fingerprint: no new data, the run ends early.
  New fingerprint (or no champion yet): retrain, and the registry's champion gate decides promotion.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blendsign.ingest import data_fingerprint
from blendsign.registry import CHALLENGER, CHAMPION, PREVIOUS
from blendsign.storage import file_sha256, is_s3, s3_client, split_s3, uri_text, write_json_atomic

log = logging.getLogger(__name__)

RETRAIN, SKIP = "retrain", "skip"


def _entries(uri: str) -> list[tuple[str, int, str]]:
    """(name relative to ``uri``, size, content version) of every object or file at or under ``uri``."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        return sorted((o["Key"][len(key):], int(o["Size"]), o["ETag"].strip('"'))
                      for page in pages for o in page.get("Contents", []))
    path = Path(uri)
    if path.is_file():
        return [("", path.stat().st_size, file_sha256(path))]
    if not path.is_dir():
        raise FileNotFoundError(f"nothing at {uri}")
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size, file_sha256(p))
                  for p in path.rglob("*") if p.is_file())


def source_digest(*uris: str | Path | None) -> str:
    """SHA-256 over the listing of every input URI (empty ones skipped); changes when any input changes.

    S3: key, size and ETag of every object under the prefix (a listing, no download). Local: relative
    path, size and SHA-256 of every file (content, so that rewriting identical files changes nothing).
    """
    h = hashlib.sha256()
    for uri in uris:
        if uri is None or not str(uri):
            continue
        text = uri_text(uri)
        entries = _entries(text)
        h.update(json.dumps([text, entries]).encode())
        log.info("%s: %d objects", text, len(entries))
    return h.hexdigest()


@dataclass(frozen=True)
class RetrainDecision:
    """Whether a pipeline run trains, and why."""

    retrain: bool
    reason: str
    fingerprint: str  # this run's dataset fingerprint
    model_name: str
    champion_version: str | None = None
    champion_fingerprint: str | None = None

    @property
    def status(self) -> str:
        """``retrain`` or ``skip`` (what the pipeline's condition tests)."""
        return RETRAIN if self.retrain else SKIP

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrainDecision:
        return cls(**{k: v for k, v in data.items() if k != "status"})

    def markdown(self) -> str:
        return "\n".join([
            f"# Retraining decision: {self.status}", "", self.reason, "",
            f"- dataset fingerprint: `{self.fingerprint}`",
            f"- registered model: `{self.model_name}`, champion "
            + (f"v{self.champion_version} (fingerprint `{self.champion_fingerprint}`)"
               if self.champion_version else "none"), "",
        ])


def decide(ingest_dir: str | Path, *, client: Any, model_name: str, only_if_new_data: bool = True) -> RetrainDecision:
    """Retrain unless ``only_if_new_data`` and the registry already holds a model of this very dataset.

    ``client`` is an ``mlflow.MlflowClient``. "Already holds" means: the ``champion`` version's
    ``data_fingerprint`` tag equals this dataset's fingerprint, or the ``challenger``'s or ``previous-champion``'s
    does (trained on exactly this data, it lost the gate or was rolled back; training it again would repeat
    that). A version without an alias is an unfinished registration and does not count.
    """
    from mlflow.exceptions import MlflowException

    fingerprint = data_fingerprint(ingest_dir)
    champion = None
    with contextlib.suppress(MlflowException):  # no such model, or no champion alias
        champion = client.get_model_version_by_alias(model_name, CHAMPION)
    version = str(champion.version) if champion is not None else None
    champion_fp = champion.tags.get("data_fingerprint") if champion is not None else None

    def made(retrain: bool, reason: str) -> RetrainDecision:
        decision = RetrainDecision(retrain, reason, fingerprint, model_name, version, champion_fp)
        log.info("%s", reason)
        return decision

    if not only_if_new_data:
        return made(True, "retraining: requested unconditionally (only_if_new_data is off)")
    if champion is None:
        return made(True, f"retraining: {model_name} has no champion yet")
    if champion_fp == fingerprint:
        return made(False, f"no new data since champion v{version} of {model_name} "
                           f"(dataset fingerprint {fingerprint[:12]} unchanged): nothing to train")
    for alias in (CHALLENGER, PREVIOUS):  # completed registrations only: the alias moves last
        other = None
        with contextlib.suppress(MlflowException):
            other = client.get_model_version_by_alias(model_name, alias)
        if other is not None and str(other.version) != version and other.tags.get("data_fingerprint") == fingerprint:
            return made(False, f"no new data since v{other.version} of {model_name} ({alias}, not champion "
                               f"v{version}) was trained on this dataset (fingerprint {fingerprint[:12]}): "
                               "nothing to train")
    return made(True, f"retraining: new data (fingerprint {fingerprint[:12]}, champion v{version} has "
                      f"{(champion_fp or 'none')[:12]})")


def write_decision(decision: RetrainDecision, path: str | Path) -> None:
    write_json_atomic(path, decision.to_dict())


def read_decision(path: str | Path) -> RetrainDecision:
    return RetrainDecision.from_dict(json.loads(Path(path).read_text()))

