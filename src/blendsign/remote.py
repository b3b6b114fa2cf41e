"""Stages on ``s3://bucket/prefix`` as well as local paths: the path-based stage functions wrapped in
:func:`blendsign.storage.local_input` / :func:`blendsign.storage.local_output`.

An S3 input is mirrored to a local folder (``cache`` keeps the mirror between runs); an S3 output is
staged locally and published only when the stage succeeds (changed files, stale objects deleted,
``_SUCCESS`` last). Stage outputs read from S3 must carry that marker.

Pseudonym key: with an S3 output (or an S3 ingest read by ``fuse``) the key must come from
``BLENDSIGN_PSEUDONYM_KEY``; a key file is never created, and nothing beside a staging folder is uploaded.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from blendsign.config import FoldConfig, IngestConfig, LabelConfig
from blendsign.deid import KEY_ENV
from blendsign.errors import ConfigError
from blendsign.folds import FoldsResult, make_folds
from blendsign.ingest import IngestResult, find_clinical, ingest
from blendsign.labels import FuseResult, fuse
from blendsign.storage import is_s3, local_input, local_output, scratch_dir, uri_text


class _Result(Protocol):
    """A stage's result, which summarises itself."""

    def summary(self) -> str: ...


R = TypeVar("R", bound=_Result)  # IngestResult, FuseResult, FoldsResult


@dataclass(frozen=True)
class StageResult(Generic[R]):
    """A stage's result and where its output went (``result``'s own paths name the local staging folder)."""

    uri: str  # the output as given: local path or s3:// URI
    local: Path  # the folder the stage wrote (for S3 a staging folder, gone after the call unless cached)
    result: R

    def summary(self) -> str:
        text = self.result.summary()
        return text.replace(str(self.local), self.uri) if is_s3(self.uri) else text


def _require_env_key(why: str) -> None:
    if not os.environ.get(KEY_ENV):
        raise ConfigError(f"{why}: set {KEY_ENV} (a key file cannot live beside an s3:// location, and must "
                         "never be uploaded with the data)")


def ingest_uri(
    source: str | Path,
    out: str | Path,
    cfg: IngestConfig,
    *,
    clinical_csv: str | Path | None = None,
    progress: bool = True,
    cache: Path | None = None,
) -> StageResult[IngestResult]:
    """:func:`blendsign.ingest.ingest` from/to local paths or S3 prefixes.

    An S3 ``out`` is prefetched into the staging folder, so scans whose source digest is unchanged are
    reused, not decoded again (source digests are of the files' bytes, so a fresh mirror digests the same).
    Without ``clinical_csv``, ``clinical.csv`` is looked for in and beside the source
    (:func:`blendsign.ingest.find_clinical`, for S3 prefixes and local folders alike).
    """
    source, out = uri_text(source), uri_text(out)
    if is_s3(out):
        _require_env_key(f"ingest into {out}")
    with ExitStack() as stack:
        root = stack.enter_context(scratch_dir(cache))
        src = stack.enter_context(local_input(source, cache=root, progress=progress))
        clinical_uri = uri_text(clinical_csv) if clinical_csv else find_clinical(source) if is_s3(source) else None
        clinical = stack.enter_context(local_input(clinical_uri, cache=root)) if clinical_uri else None
        dst = stack.enter_context(local_output(out, cache=root, prefetch=True))
        result = ingest(src, dst, cfg, clinical_csv=clinical, progress=progress)
    return StageResult(out, Path(dst), result)


def fuse_uri(
    annotations: str | Path,
    ingest_dir: str | Path,
    out: str | Path,
    cfg: LabelConfig | None = None,
    *,
    cache: Path | None = None,
) -> StageResult[FuseResult]:
    """:func:`blendsign.labels.fuse` from/to local paths or S3 (an S3 ingest must be complete: ``_SUCCESS``)."""
    annotations, ingest_dir, out = uri_text(annotations), uri_text(ingest_dir), uri_text(out)
    if is_s3(ingest_dir):
        _require_env_key(f"fuse with the ingest at {ingest_dir}")
    with ExitStack() as stack:
        root = stack.enter_context(scratch_dir(cache))
        ann = stack.enter_context(local_input(annotations, cache=root))
        ing = stack.enter_context(local_input(ingest_dir, cache=root, require_marker=True))
        dst = stack.enter_context(local_output(out, cache=root))
        result = fuse(ann, ing, dst, cfg)
    return StageResult(out, Path(dst), result)


def folds_uri(
    labels_dir: str | Path, out: str | Path, cfg: FoldConfig | None = None, *, cache: Path | None = None
) -> StageResult[FoldsResult]:
    """:func:`blendsign.folds.make_folds` from/to local paths or S3 (an S3 ``labels_dir`` must be complete)."""
    labels_dir, out = uri_text(labels_dir), uri_text(out)
    with ExitStack() as stack:
        root = stack.enter_context(scratch_dir(cache))
        lab = stack.enter_context(local_input(labels_dir, cache=root, require_marker=True))
        dst = stack.enter_context(local_output(out, cache=root))
        result = make_folds(lab, dst, cfg)
    return StageResult(out, Path(dst), result)
