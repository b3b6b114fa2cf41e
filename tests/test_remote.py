"""blendsign.remote: the stages on s3:// prefixes of a real S3-compatible server (moto's server mode on 127.0.0.1):
ingest, fuse and folds from and to S3 prefixes, Parquet read in place with pyarrow, idempotent re-runs, failures,
the CLI's cache of mirrors."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from blendsign import remote, storage
from blendsign.config import Config, load_preset
from blendsign.deid import KEY_ENV, Pseudonymizer
from blendsign.folds import make_folds
from blendsign.ingest import ingest
from blendsign.labels import fuse
from blendsign.storage import MARKER, SyncStats, local_input, parquet_filesystem, sync_up
from blendsign.synth import synthesize
from tests.conftest import ACCESS_KEY, BUCKET, SECRET_KEY, keys, real_file

PSEUDONYM_KEY = "s3-test-pseudonym-key-0123456789abcdef"
REAL_FILES = ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_UNCI.dcm")


@pytest.fixture(autouse=True)
def _pseudonym_key(_no_env_key: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """One key from the environment (as an s3:// output requires), so S3 and local runs share pseudonyms."""
    monkeypatch.setenv(KEY_ENV, PSEUDONYM_KEY)


@dataclass(frozen=True)
class Cohort:
    root: Path  # dicom/ (synthetic study + real pydicom files + a text file), annotations.csv, clinical.csv
    cfg: Config


@pytest.fixture(scope="module")
def s3_cohort(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """A small DICOM export, uploaded to s3://BUCKET/raw/ (no marker: raw data is not a stage output)."""
    cfg = load_preset("ci")
    cfg = replace(cfg, synth=replace(cfg.synth, scans=3), folds=replace(cfg.folds, k=2))
    root = tmp_path_factory.mktemp("cohort")
    synthesize(root, cfg.synth, progress=False)
    real = root / "dicom" / "real"
    real.mkdir()
    for name in REAL_FILES:
        shutil.copyfile(real_file(name), real / name)
    (root / "dicom" / "notes.txt").write_text("not a DICOM file\n")
    sync_up(root, f"s3://{BUCKET}/raw", marker=False)
    return Cohort(root, cfg)


def get_json(client: Any, key: str) -> Any:
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def sorted_rows(table: Any) -> list[dict[str, Any]]:
    return sorted(table.to_pylist(), key=lambda r: (r["scan_id"], r["slice_index"]))


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> list[SyncStats]:
    """Every ``sync_up`` that ``local_output`` makes, recorded."""
    calls: list[SyncStats] = []
    real = storage.sync_up

    def spy(*args: Any, **kwargs: Any) -> SyncStats:
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(storage, "sync_up", spy)
    return calls


def test_ingest_s3_to_s3(s3: Any, s3_cohort: Cohort, tmp_path: Path, uploads: list[SyncStats],
                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    out = f"s3://{BUCKET}/ds/ingest"
    result = remote.ingest_uri(f"s3://{BUCKET}/raw/dicom", out, s3_cohort.cfg.ingest, progress=False)
    assert out in result.summary() and str(result.local) not in result.summary()

    objects = keys(s3, "ds/ingest/")
    names = {k.removeprefix("ds/ingest/") for k in objects}
    assert {MARKER, "manifest.json", "ingest_report.json", "ingest_report.md"} <= names
    assert not any("pseudonym-key" in k for k in keys(s3, ""))  # the key is neither uploaded nor created
    report = get_json(s3, "ds/ingest/ingest_report.json")
    notes = f"file-{Pseudonymizer(PSEUDONYM_KEY.encode()).file('notes.txt')}"
    assert notes in {q["file"] for q in report["quarantined"]}
    manifest = get_json(s3, "ds/ingest/manifest.json")
    slices = {n for n in names if n.startswith("slices/")}
    assert {f"slices/{s['scan_id']}.parquet" for s in manifest["scans"]} == slices
    assert get_json(s3, f"ds/ingest/{MARKER}")["files"] == len(names) - 1

    # the same files ingested locally: same rows (same key ⇒ same pseudonyms), same report
    local = ingest(s3_cohort.root / "dicom", tmp_path / "local", s3_cohort.cfg.ingest, progress=False)
    fs, path = parquet_filesystem(f"{out}/slices/")
    assert path == f"{BUCKET}/ds/ingest/slices"
    from_s3 = ds.dataset(path, filesystem=fs, format="parquet").to_table()
    assert from_s3.num_rows == local.report["slices_written"] > 0
    assert sorted_rows(from_s3) == sorted_rows(pq.read_table(tmp_path / "local" / "slices"))
    for field in ("studies_found", "excluded", "scans_written", "quarantined", "duplicates", "key_fingerprint"):
        assert report[field] == local.report[field], field

    # re-runs: the Parquet files are reused, not re-uploaded; a second re-run uploads nothing at all
    assert uploads[0].transferred == len(names) - 1
    remote.ingest_uri(f"s3://{BUCKET}/raw/dicom", out, s3_cohort.cfg.ingest, progress=False)
    assert get_json(s3, "ds/ingest/ingest_report.json")["scans_reused"] == report["scans_written"]
    assert uploads[1].transferred == 1  # ingest_report.json: only its scans_reused count changed
    after = keys(s3, "ds/ingest/")
    remote.ingest_uri(f"s3://{BUCKET}/raw/dicom", out, s3_cohort.cfg.ingest, progress=False)
    assert uploads[2] == SyncStats(skipped=len(names) - 1)
    assert keys(s3, "ds/ingest/") == after
    assert {k: v for k, v in after.items() if "/slices/" in k} == {k: v for k, v in objects.items() if "/slices/" in k}

    assert ACCESS_KEY not in caplog.text and SECRET_KEY not in caplog.text
    assert "s3://blendsign-test/ds/ingest/" in caplog.text  # bucket and prefix are logged


def test_failed_stage_uploads_nothing(s3: Any, s3_cohort: Cohort, monkeypatch: pytest.MonkeyPatch,
                                      uploads: list[SyncStats]) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        ingest(*args, **kwargs)  # writes everything into the staging folder, then fails
        raise RuntimeError("stage failed after writing")

    monkeypatch.setattr(remote, "ingest", failing)
    with pytest.raises(RuntimeError, match="after writing"):
        remote.ingest_uri(f"s3://{BUCKET}/raw/dicom", f"s3://{BUCKET}/failed/ingest", s3_cohort.cfg.ingest,
                          progress=False)
    assert uploads == [] and keys(s3, "failed/") == {}


def test_s3_output_needs_key_from_environment(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=KEY_ENV):
        remote.ingest_uri(f"s3://{BUCKET}/raw/dicom", f"s3://{BUCKET}/nokey/ingest", load_preset("ci").ingest)
    assert keys(s3, "nokey/") == {}


def test_fuse_and_folds_through_s3(s3: Any, s3_cohort: Cohort, tmp_path: Path) -> None:
    ingest_uri, labels_uri, folds_uri = (f"s3://{BUCKET}/ff/{n}" for n in ("ingest", "labels", "folds"))
    with pytest.raises(FileNotFoundError, match=MARKER):  # an incomplete (marker-less) prefix is refused
        remote.folds_uri(f"s3://{BUCKET}/raw", folds_uri, s3_cohort.cfg.folds)
    remote.ingest_uri(f"s3://{BUCKET}/raw/dicom", ingest_uri, s3_cohort.cfg.ingest, progress=False)
    fused = remote.fuse_uri(f"s3://{BUCKET}/raw/annotations.csv", ingest_uri, labels_uri, s3_cohort.cfg.labels)
    folds = remote.folds_uri(labels_uri, folds_uri, s3_cohort.cfg.folds)
    assert labels_uri in fused.summary() and folds_uri in folds.summary()
    assert {f"ff/labels/{n}" for n in ("labels.parquet", "agreement.json", "agreement.md", MARKER)} == set(
        keys(s3, "ff/labels/"))
    assert {f"ff/folds/{n}" for n in ("folds.parquet", "folds.json", "folds.md", MARKER)} == set(keys(s3, "ff/folds/"))

    ingest(s3_cohort.root / "dicom", tmp_path / "ingest", s3_cohort.cfg.ingest, progress=False)
    local_fused = fuse(s3_cohort.root / "annotations.csv", tmp_path / "ingest", tmp_path / "labels",
                       s3_cohort.cfg.labels)
    local_folds = make_folds(tmp_path / "labels", tmp_path / "folds", s3_cohort.cfg.folds)
    assert fused.result.gold_counts == local_fused.gold_counts and folds.result.table == local_folds.table
    for uri, local in ((f"{labels_uri}/labels.parquet", tmp_path / "labels" / "labels.parquet"),
                       (f"{folds_uri}/folds.parquet", tmp_path / "folds" / "folds.parquet")):
        fs, path = parquet_filesystem(uri)
        assert pq.read_table(path, filesystem=fs).equals(pq.read_table(local))

    # a cache keeps the mirror: a second read downloads nothing, a single object is a file
    with local_input(ingest_uri, cache=tmp_path / "cache", require_marker=True) as mirror:
        assert (mirror / "ingest_report.json").is_file() and (mirror / MARKER).is_file()  # complete, as the prefix
    with local_input(f"s3://{BUCKET}/raw/annotations.csv", cache=tmp_path / "cache") as csv:
        assert csv.read_bytes() == (s3_cohort.root / "annotations.csv").read_bytes()
    stats = storage.sync_down(ingest_uri, mirror)
    assert stats.transferred == 0 and stats.skipped > 0


def test_a_cli_cache_keeps_the_mirror_and_scratch_of_killed_runs_is_removed(
        s3: Any, s3_cohort: Cohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blendsign.cli import main

    downloads: list[int] = []
    real = storage.sync_down

    def counting(*args: Any, **kw: Any) -> SyncStats:
        stats = real(*args, **kw)
        downloads.append(stats.transferred)
        return stats

    monkeypatch.setattr(storage, "sync_down", counting)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    source = f"s3://{BUCKET}/raw/dicom/"
    for out in ("one", "two"):
        assert main(["ingest", source, str(tmp_path / out), "--no-progress"]) == 0
    assert downloads[0] > 0 and downloads[1] == 0  # the second run found every object in the cache

    # a temporary mirror a killed run left behind (its pid is gone) goes; a live one stays
    monkeypatch.setattr(storage.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    dead = tmp_path / "tmp" / f"{storage.SCRATCH_PREFIX}999999999-x"
    live = tmp_path / "tmp" / f"{storage.SCRATCH_PREFIX}{os.getpid()}-y"
    dead.mkdir()
    live.mkdir()
    with storage.scratch_dir(None) as scratch:
        assert scratch.parent == tmp_path / "tmp" and scratch.name.startswith(f"{storage.SCRATCH_PREFIX}{os.getpid()}-")
    assert not dead.exists() and live.exists() and not scratch.exists()
