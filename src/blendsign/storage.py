"""Where stages read and write: atomic local files, and ``s3://bucket/prefix`` through a local mirror.

Local writes are atomic: a reader sees the old file or the new one, never half of one. Stage functions
stay path-based; :func:`local_input` and :func:`local_output` put S3 around them. Endpoint and
credentials come only from the standard environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``/``AWS_REGION``, profiles and
roles), with MLflow's ``MLFLOW_S3_ENDPOINT_URL`` as a fallback endpoint. Logs name buckets, prefixes and
counts; never a credential or a signed request.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from blendsign.errors import InputError
from blendsign.progress import progress as progress_bar

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)


MARKER = "_SUCCESS"  # written last into an output folder or under an output prefix: the output there is complete


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temporary name starts with ``.`` so Parquet dataset readers ignore it if a run is killed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN and infinities as null, which every JSON reader accepts), replaced in one step."""
    write_text_atomic(path, json.dumps(_finite_or_null(obj), indent=2, sort_keys=True, default=str,
                                       allow_nan=False) + "\n")


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def mark_complete(folder: str | Path) -> None:
    """Write the completion marker (:data:`MARKER`) into a local output, last: the output there is complete."""
    write_text_atomic(Path(folder) / MARKER, "")


def clear_complete(folder: str | Path) -> None:
    """Remove a local output's completion marker before the first change to it."""
    (Path(folder) / MARKER).unlink(missing_ok=True)


def require_complete(folder: str | Path, what: str) -> None:
    """Raise ``FileNotFoundError`` unless the local output ``folder`` holds its completion marker."""
    if not (Path(folder) / MARKER).is_file():
        raise FileNotFoundError(
            f"{folder} is not a complete {what} output (no {MARKER} marker): the {what} that wrote it was killed "
            f"or is still running, so its files may mix two runs. Run the {what} again (it reuses what is done)."
        )


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries left by a killed run (``.<name>.<pid>.tmp``); returns how many."""
    removed = 0
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


# --- S3 ----------------------------------------------------------------------------------------------

PART_SIZE = 8 * 1024 * 1024  # multipart threshold and part size of uploads (boto3's default)
WORKERS = 8  # concurrent transfers
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
# botocore's DEBUG records carry signed headers (access key id, session token): never let -v show them.
_QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def uri_text(uri: str | Path) -> str:
    """``uri`` as text; ``Path("s3://b/k")`` (which collapses to ``s3:/b/k``) is repaired."""
    s = str(uri)
    if s.startswith("s3:/") and not s.startswith("s3://"):
        s = "s3://" + s[len("s3:/"):]
    return s


def is_s3(uri: str | Path) -> bool:
    """Whether ``uri`` names S3 (``s3://bucket[/key]``)."""
    return uri_text(uri).startswith("s3://")


def join(uri: str | Path, *names: str) -> str:
    """``uri/name/…`` for a local path or an ``s3://`` prefix."""
    s = uri_text(uri)
    return "/".join([s.rstrip("/"), *names]) if is_s3(s) else str(Path(s).joinpath(*names))


def sibling(uri: str | Path, name: str) -> str:
    """``name`` beside ``uri``: ``s3://b/raw/dicom`` → ``s3://b/raw/<name>``, ``/x/dicom`` → ``/x/<name>``."""
    s = uri_text(uri)
    if not is_s3(s):
        return str(Path(s).resolve().parent / name)
    bucket, key = split_s3(s)
    parent = key.rstrip("/").rpartition("/")[0]
    return f"s3://{bucket}/{parent + '/' if parent else ''}{name}"


def exists(uri: str | Path) -> bool:
    """Whether a file (an S3 object) or a non-empty folder (an S3 prefix holding objects) is at ``uri``."""
    s = uri_text(uri)
    if not is_s3(s):
        return Path(s).is_file() or (Path(s).is_dir() and any(Path(s).iterdir()))
    client = s3_client()
    bucket, key = split_s3(s)
    return (bool(key) and not key.endswith("/") and _object(client, bucket, key) is not None) or \
        _has_objects(client, bucket, key)


def is_file(uri: str | Path) -> bool:
    """Whether a file, or an S3 object at exactly that key, is at ``uri``."""
    s = uri_text(uri)
    if not is_s3(s):
        return Path(s).is_file()
    bucket, key = split_s3(s)
    return bool(key) and not key.endswith("/") and _object(s3_client(), bucket, key) is not None


def split_s3(uri: str | Path) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")`` (key may be empty or end with ``/``)."""
    s = uri_text(uri)
    if not s.startswith("s3://"):
        raise InputError(f"not an s3:// URI: {s}")
    bucket, _, key = s[len("s3://"):].partition("/")
    if not bucket:
        raise InputError(f"no bucket in {s}")
    return bucket, key.lstrip("/")


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
    ``MLFLOW_S3_ENDPOINT_URL``, first set wins); ``None``: AWS itself."""
    return next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)


_ENV_VARS = (*_ENDPOINT_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def s3_client() -> Any:
    """A boto3 S3 client from the standard environment only (path-style addressing on a custom endpoint).

    Clients are thread-safe and costly to build (~0.5 s): one is kept per distinct environment.
    """
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)
    return _client(tuple(os.environ.get(v) for v in _ENV_VARS))


@functools.lru_cache(maxsize=4)
def _client(env: tuple[str | None, ...]) -> Any:
    """The client for one environment (``env`` only keys the cache; boto3 reads the environment itself)."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url()
    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=2 * WORKERS,
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def parquet_filesystem(uri: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and path for ``uri``, to scan Parquet in place (S3: no download).

    ``pyarrow.dataset.dataset(path, filesystem=fs, format="parquet")`` then reads ``s3://…/slices/``.
    """
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    bucket, key = split_s3(uri)
    opts: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    }
    endpoint = endpoint_url()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        opts.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        opts.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                    session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**opts), f"{bucket}/{key}".rstrip("/")


@dataclass(frozen=True)
class S3Object:
    key: str  # full key
    size: int
    etag: str  # without quotes
    mtime: float  # LastModified, POSIX seconds


@dataclass(frozen=True)
class SyncStats:
    """What a sync did (``transferred`` files, ``skipped`` as already identical, ``deleted`` stale)."""

    transferred: int = 0
    skipped: int = 0
    deleted: int = 0
    bytes: int = 0


def _prefix(key: str) -> str:
    """A key as a folder prefix: ``""`` (whole bucket) or ending with ``/``."""
    return key if not key or key.endswith("/") else key + "/"


def list_objects(client: Any, bucket: str, prefix: str) -> dict[str, S3Object]:
    """Objects under ``prefix`` (paginated), by key relative to it; folder placeholders left out."""
    out: dict[str, S3Object] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix):]
            if rel and not rel.endswith("/"):
                out[rel] = S3Object(o["Key"], int(o["Size"]), o["ETag"].strip('"'), o["LastModified"].timestamp())
    return out


def _etags(path: Path) -> set[str]:
    """The ETags S3 gives ``path``'s content: single-part MD5 and multipart with ``PART_SIZE`` parts."""
    whole, parts = hashlib.md5(usedforsecurity=False), []
    with path.open("rb") as f:
        while chunk := f.read(PART_SIZE):
            whole.update(chunk)
            parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    multi = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
    return {whole.hexdigest(), f"{multi}-{max(len(parts), 1)}"}


def _same(path: Path, obj: S3Object) -> bool:
    """Whether local ``path`` holds ``obj``'s content (size, then ETag)."""
    try:
        if path.stat().st_size != obj.size:
            return False
    except FileNotFoundError:
        return False
    return obj.etag in _etags(path)


def _safe_join(root: Path, rel: str) -> Path:
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts:
        raise InputError(f"refusing object key outside its prefix: {rel!r}")
    return root.joinpath(*parts)


def _parallel(fn: Callable[[Any], Any], items: Iterable[Any]) -> None:
    with ThreadPoolExecutor(WORKERS) as pool:
        for _ in pool.map(fn, items):  # re-raises the first failure
            pass


def _download(client: Any, bucket: str, obj: S3Object, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        client.download_file(bucket, obj.key, str(tmp))
        os.utime(tmp, (obj.mtime, obj.mtime))  # the mirror shows when the object was written


def sync_down(uri: str | Path, local_dir: str | Path, *, delete: bool = True, client: Any = None,
              progress: bool = False) -> SyncStats:
    """Mirror the prefix ``uri`` into ``local_dir``: download new or changed objects (size + ETag),
    give each file the object's LastModified as mtime, and (``delete``) remove local files not in the
    prefix. The mirror of a prefix with a completion marker gets a local marker (:func:`mark_complete`), written
    after every file; one without it gets none."""
    client = client or s3_client()
    bucket, key = split_s3(uri)
    prefix, root = _prefix(key), Path(local_dir)
    remote = list_objects(client, bucket, prefix)
    complete = remote.pop(MARKER, None) is not None
    clear_complete(root)
    todo = [(rel, o) for rel, o in remote.items() if not _same(_safe_join(root, rel), o)]
    bar = progress_bar(total=sum(o.size for _, o in todo), desc=f"s3://{bucket}/{prefix}", unit="B",
                       enabled=progress and bool(todo))

    lock = threading.Lock()

    def fetch(item: tuple[str, S3Object]) -> None:
        _download(client, bucket, item[1], _safe_join(root, item[0]))
        with lock:
            bar.update(item[1].size)

    try:
        _parallel(fetch, todo)
    finally:
        bar.close()
    deleted = 0
    if delete and root.is_dir():
        for p in [p for p in root.rglob("*") if p.is_file()]:
            if p.relative_to(root).as_posix() not in remote:
                p.unlink()
                deleted += 1
    if complete:
        mark_complete(root)
    stats = SyncStats(len(todo), len(remote) - len(todo), deleted, sum(o.size for _, o in todo))
    log.info("s3://%s/%s → local: %d downloaded (%d bytes), %d unchanged, %d local files removed",
             bucket, prefix, stats.transferred, stats.bytes, stats.skipped, stats.deleted)
    return stats


def _local_files(root: Path) -> dict[str, Path]:
    """Files under ``root`` by POSIX relative path; hidden names (temporaries) and the marker left out."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() != MARKER:
            out[rel.as_posix()] = p
    return out


def sync_up(local_dir: str | Path, uri: str | Path, *, delete: bool = True, marker: bool = True,
            client: Any = None, last: Sequence[str] = ()) -> SyncStats:
    """Publish ``local_dir`` at the prefix ``uri``: upload new or changed files only, delete objects the
    folder no longer has (``delete``), and write the ``_SUCCESS`` marker last (``marker``).

    The marker is removed before the first change, so a reader never takes a half-updated prefix for a
    complete one. Nothing changed and a marker present: nothing is written at all. Files named in ``last``
    (base names) are uploaded after all the others: a checkpoint that says "finished" never arrives before the
    model it finished.
    """
    from boto3.s3.transfer import TransferConfig

    client = client or s3_client()
    bucket, key = split_s3(uri)
    prefix = _prefix(key)
    if delete and not prefix.strip("/"):
        raise InputError(f"refusing to mirror a folder onto the whole bucket s3://{bucket} (give a prefix)")
    local = _local_files(Path(local_dir))
    remote = list_objects(client, bucket, prefix)
    has_marker = remote.pop(MARKER, None) is not None
    todo = [rel for rel, p in local.items() if rel not in remote or not _same(p, remote[rel])]
    stale = sorted(set(remote) - set(local)) if delete else []
    if not todo and not stale and (has_marker or not marker):
        log.info("local → s3://%s/%s: up to date (%d files)", bucket, prefix, len(local))
        return SyncStats(skipped=len(local))
    if has_marker:
        client.delete_object(Bucket=bucket, Key=prefix + MARKER)
    transfer = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
    for batch in ([r for r in todo if Path(r).name not in last], [r for r in todo if Path(r).name in last]):
        _parallel(lambda rel: client.upload_file(str(local[rel]), bucket, prefix + rel, Config=transfer), batch)
    for i in range(0, len(stale), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": prefix + k} for k in stale[i:i + 1000]],
                                                     "Quiet": True})
    total = sum(p.stat().st_size for p in local.values())
    if marker:
        body = json.dumps({"files": len(local), "bytes": total}, sort_keys=True).encode()
        client.put_object(Bucket=bucket, Key=prefix + MARKER, Body=body)
    stats = SyncStats(len(todo), len(local) - len(todo), len(stale), sum(local[r].stat().st_size for r in todo))
    log.info("local → s3://%s/%s: %d uploaded (%d bytes), %d unchanged, %d stale objects deleted",
             bucket, prefix, stats.transferred, stats.bytes, stats.skipped, stats.deleted)
    return stats


def _has_objects(client: Any, bucket: str, key: str) -> bool:
    """Whether any object lies under the prefix ``key``."""
    return bool(client.list_objects_v2(Bucket=bucket, Prefix=_prefix(key), MaxKeys=1).get("KeyCount"))


def _object(client: Any, bucket: str, key: str) -> S3Object | None:
    """The object at exactly ``key``, or ``None``."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return S3Object(key, int(head["ContentLength"]), head["ETag"].strip('"'), head["LastModified"].timestamp())


@contextmanager
def scratch_dir(cache: Path | None) -> Iterator[Path]:
    """``cache`` itself (kept), or a temporary folder removed on exit. Temporary folders that a killed run left
    behind (their process is gone) are removed first."""
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
        yield Path(cache)
        return
    remove_orphaned_scratch()
    tmp = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SCRATCH_PREFIX = "blendsign-s3-"
CACHE_ENV = "BLENDSIGN_CACHE"  # a folder that keeps S3 mirrors between runs (unset: temporary, removed)


def default_cache() -> Path | None:
    """``$BLENDSIGN_CACHE`` as a path, or None (a temporary mirror per run: nothing of the source stays here)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value) if value else None


def remove_orphaned_scratch(root: str | Path | None = None) -> int:
    """Remove ``blendsign-s3-<pid>-*`` folders under the temporary folder whose process no longer runs."""
    removed = 0
    for p in Path(root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        pid = p.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or not p.is_dir():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d S3 scratch folders that killed runs left in %s", removed, root or tempfile.gettempdir())
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def mirror_path(root: Path, uri: str | Path) -> Path:
    """Where ``uri`` lives in a local mirror rooted at ``root``: ``root/bucket/key``."""
    bucket, key = split_s3(uri)
    return _safe_join(root / bucket, key.rstrip("/")) if key.strip("/") else root / bucket


@contextmanager
def local_input(uri: str | Path, *, cache: Path | None = None, require_marker: bool = False,
                progress: bool = False) -> Iterator[Path]:
    """A local path holding ``uri``: a local path as is; an S3 object as a file, an S3 prefix as a folder.

    S3 data is mirrored to ``cache/bucket/key`` (kept, so re-runs download only what changed) or to a
    temporary folder removed on exit. A key ending with ``/`` is always a prefix; otherwise an object at
    exactly that key wins. ``require_marker``: the prefix must hold a ``_SUCCESS`` marker (a complete
    stage output), else ``FileNotFoundError``.
    """
    if not is_s3(uri):
        yield Path(uri)
        return
    client = s3_client()
    bucket, key = split_s3(uri)
    with scratch_dir(cache) as root:
        local = mirror_path(root, uri)
        obj = _object(client, bucket, key) if key and not key.endswith("/") else None
        if obj is not None:
            if not _same(local, obj):
                _download(client, bucket, obj, local)
                log.info("s3://%s/%s → local: downloaded (%d bytes)", bucket, key, obj.size)
            yield local
            return
        prefix = _prefix(key)
        if not _has_objects(client, bucket, key):
            raise FileNotFoundError(f"nothing at s3://{bucket}/{prefix}")
        if require_marker and _object(client, bucket, prefix + MARKER) is None:
            raise FileNotFoundError(f"s3://{bucket}/{prefix} has no {MARKER} marker: the stage that writes it "
                                    "did not finish")
        sync_down(uri, local, client=client, progress=progress)
        yield local


@contextmanager
def local_output(uri: str | Path, *, cache: Path | None = None, prefetch: bool = False) -> Iterator[Path]:
    """A local folder to write ``uri`` into: a local path as is; for S3 a staging folder published with
    :func:`sync_up` (changed files, stale objects deleted, marker last) only if the block succeeds.

    On an exception nothing is uploaded and the prefix keeps its previous, complete content. The staging
    folder is ``cache/bucket/key`` (kept) or temporary; its sibling files (such as a pseudonym key
    file beside the output) are never uploaded. ``prefetch`` first mirrors the prefix into the staging
    folder, so a stage that reuses its earlier outputs finds them.
    """
    if not is_s3(uri):
        yield Path(uri)
        return
    bucket, key = split_s3(uri)
    if not key.strip("/"):
        raise InputError(f"an output needs a prefix, not the whole bucket s3://{bucket}")
    with scratch_dir(cache) as root:
        staging = mirror_path(root, uri)
        staging.mkdir(parents=True, exist_ok=True)
        if prefetch:
            sync_down(uri, staging)
        try:
            yield staging
        except BaseException:
            log.warning("stage failed: nothing uploaded to s3://%s/%s", bucket, key)
            raise
        sync_up(staging, uri)


class Mirror:
    """A local working folder kept in step with ``uri`` while a long job writes into it.

    ``uri`` local: the folder itself (nothing to copy). ``uri`` on S3: a staging folder that starts as a copy of
    the prefix (so a retried or pre-empted job finds its checkpoints) and is published with :meth:`push` (changed
    files only, stale objects deleted; no completion marker: the prefix is work in progress).
    """

    def __init__(self, uri: str | Path, local: Path, last: Sequence[str] = ()) -> None:
        self.uri, self.local, self.last = uri_text(uri), local, tuple(last)

    def push(self) -> None:
        if is_s3(self.uri):
            sync_up(self.local, self.uri, marker=False, last=self.last)


@contextmanager
def mirrored(uri: str | Path, *, cache: Path | None = None, last: Sequence[str] = ()) -> Iterator[Mirror]:
    """A :class:`Mirror` of ``uri``; pushed once more when the block ends, whether it succeeded or not. ``last``:
    base names uploaded after everything else (see :func:`sync_up`)."""
    if not is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        yield Mirror(uri, Path(uri), last)
        return
    with scratch_dir(cache) as root:
        staging = mirror_path(root, uri)
        staging.mkdir(parents=True, exist_ok=True)
        if _has_objects(s3_client(), *split_s3(uri)):
            sync_down(uri, staging)
        mirror = Mirror(uri, staging, last)
        try:
            yield mirror
        finally:
            mirror.push()
