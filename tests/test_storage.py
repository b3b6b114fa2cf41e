"""blendsign.storage: s3:// URIs, and publishing a local folder to a prefix of a real S3-compatible server (moto's
server mode on 127.0.0.1): changes only, stale objects deleted, the marker and the files named last sent last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blendsign.storage import MARKER, SyncStats, is_s3, split_s3, sync_up
from tests.conftest import BUCKET, keys


def test_uri_helpers() -> None:
    assert is_s3("s3://b/k") and is_s3(Path("s3://b/k")) and not is_s3("/data/s3/x")
    assert split_s3("s3://b/raw/dicom/") == ("b", "raw/dicom/")
    assert split_s3(Path("s3://b")) == ("b", "")
    with pytest.raises(ValueError):
        split_s3("/local/path")


def test_sync_up_publishes_changes_deletes_stale_marker_last(s3: Any, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.bin").write_bytes(b"b" * 100)
    (tmp_path / ".a.txt.123.tmp").write_text("temporary")  # hidden temporaries are never published
    uri = f"s3://{BUCKET}/sync/out"
    assert sync_up(tmp_path, uri) == SyncStats(transferred=2, bytes=101)
    assert set(keys(s3, "sync/")) == {"sync/out/a.txt", "sync/out/sub/b.bin", f"sync/out/{MARKER}"}
    (tmp_path / "sub" / "b.bin").unlink()
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "c.txt").write_text("c")
    assert sync_up(tmp_path, uri) == SyncStats(transferred=2, deleted=1, bytes=2)
    assert set(keys(s3, "sync/")) == {"sync/out/a.txt", "sync/out/c.txt", f"sync/out/{MARKER}"}
    assert sync_up(tmp_path, uri) == SyncStats(skipped=2)
    with pytest.raises(ValueError, match="whole bucket"):
        sync_up(tmp_path, f"s3://{BUCKET}")


def test_sync_up_sends_the_files_named_last_after_the_others(s3: Any, tmp_path: Path) -> None:
    """A checkpoint that says "finished" must not reach the prefix before the model it finished: a pod killed
    mid-upload then leaves an unfinished checkpoint, which the retry resumes."""
    for name in ("round0/last.pt", "round0/model.pt", "round0/history.json", "distill.json"):
        (tmp_path / "job" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "job" / name).write_bytes(name.encode() * 100)
    order: list[str] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(s3, name)

        def upload_file(self, path: str, bucket: str, key: str, **kw: Any) -> None:
            order.append(key.rsplit("/", 1)[-1])
            s3.upload_file(path, bucket, key, **kw)

    sync_up(tmp_path / "job", f"s3://{BUCKET}/work/run/jobs/fold0", marker=False, client=Recording(),
            last=("last.pt", "distill.json"))
    assert sorted(order[:2]) == ["history.json", "model.pt"] and sorted(order[2:]) == ["distill.json", "last.pt"]
    assert not any(k.endswith("_SUCCESS") for k in keys(s3, "work/run/jobs/fold0/"))  # work in progress
