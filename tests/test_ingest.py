"""blendsign.ingest: real DICOM files, series selection, ordering, exclusions, de-identification, idempotency."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from blendsign import cli
from blendsign.config import IngestConfig
from blendsign.deid import KEY_ENV, key_path_for
from blendsign.errors import InputError
from blendsign.ingest import SLICE_SCHEMA, decode_hu, encode_hu, ingest, locate, locate_slices
from tests.conftest import IDENTIFIERS, real_file

CFG = IngestConfig()
RELAXED = replace(CFG, min_age_years=0.0, require_non_contrast=False)  # CT_small.dcm: age 000Y, contrast


def read_slices(out: Path) -> list[dict]:
    rows = pq.read_table(out / "slices").to_pylist()
    return sorted(rows, key=lambda r: (r["scan_id"], r["slice_index"]))


def hu_of(row: dict) -> np.ndarray:
    return decode_hu(row["hu"], row["rows"], row["cols"])


def phantom(seed: int, shape: tuple[int, int] = (16, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


# --- real files nobody here wrote --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm", "693_UNCI.dcm", "693_UNCR.dcm"]
)
def test_real_ct_ingests_with_pydicoms_hu(tmp_path: Path, name: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(real_file(name), src / "slice")  # no .dcm extension on purpose
    result = ingest(src, tmp_path / "out", RELAXED, progress=False)
    assert result.report["slices_written"] == 1 and not result.report["quarantined"]
    ds = pydicom.dcmread(real_file(name))
    expected = apply_rescale(ds.pixel_array, ds)
    (row,) = read_slices(tmp_path / "out")
    np.testing.assert_array_equal(hu_of(row), expected)
    assert (row["rows"], row["cols"]) == (ds.Rows, ds.Columns)
    assert row["pixel_spacing_mm"] == [float(v) for v in ds.PixelSpacing]


def test_real_ct_small_is_excluded_under_paper_rules(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(real_file("CT_small.dcm"), src)
    report = ingest(src, tmp_path / "out", CFG, progress=False).report
    # its only series has ContrastBolusAgent → no non-contrast axial series (checked before age 000Y)
    assert report["excluded"] == {"postoperative": 0, "not_head_ct": 0, "no_noncontrast_axial_series": 1,
                                  "age_lt_7": 0}
    assert report["scans_written"] == 0 and report["series_skipped"] == {"contrast": 1}


def test_bad_files_are_quarantined_with_reasons(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    good = real_file("J2K_pixelrep_mismatch.dcm")
    shutil.copy(good, src / "good.dcm")
    shutil.copy(real_file("MR_small.dcm"), src / "mr.dcm")
    (src / "empty.dcm").write_bytes(b"")
    (src / "readme.txt").write_text("export notes\n")
    data = good.read_bytes()
    (src / "head_cut.dcm").write_bytes(data[:1500])
    # same header, pixel data cut short: readable header, undecodable pixels
    ds = pydicom.dcmread(real_file("693_UNCI.dcm"))
    raw = (tmp_path / "unci.dcm")
    ds.save_as(raw)
    (src / "pixels_cut.dcm").write_bytes(raw.read_bytes()[: len(raw.read_bytes()) // 2])
    report = ingest(src, tmp_path / "out", CFG, progress=False).report
    assert all(q["file"].startswith("file-") for q in report["quarantined"])  # pseudonyms, not paths
    reasons = {r["file"]: r["reason"] for r in locate(src, tmp_path / "out")}  # for whoever holds the source
    assert set(reasons) == {"mr.dcm", "empty.dcm", "readme.txt", "head_cut.dcm", "pixels_cut.dcm"}
    assert reasons["mr.dcm"] == "modality MR is not CT"
    assert reasons["empty.dcm"] == "empty file"
    assert reasons["readme.txt"] == "not a DICOM file"
    assert "truncated" in reasons["head_cut.dcm"]
    data = raw.read_bytes()
    kept = len(data) // 2 - (data.rfind(b"\xe0\x7f\x10\x00OW") + 12)  # after Pixel Data's tag, VR and length
    assert reasons["pixels_cut.dcm"] == ("pixel data cut short (Explicit VR Little Endian): the file is truncated "
                                         f"({kept} of {512 * 512 * 2} bytes)")
    assert report["scans_written"] == 1 and report["slices_written"] == 1
    assert report["scans_failed"] == [{"scan_id": report["scans_failed"][0]["scan_id"],
                                       "reason": "no slice of the scan could be decoded"}]
    md = (tmp_path / "out" / "ingest_report.md").read_text()
    assert "pixels_cut.dcm" not in md and "Quarantined files" in md and "blendsign locate" in md


# --- selection, ordering, storage --------------------------------------------------------------------


def make_study(root: Path, write: Callable[..., str], *, study: str = "1.2.3.1", unsigned12: bool = False,
               descending: bool = False, age: str = "054Y", patient_id: str = "PID-0001") -> dict[str, np.ndarray]:
    """A study with a localizer, a contrast series, a coronal reformat and a 5-slice axial series whose
    InstanceNumbers run against z. Returns the axial slices' HU by SOPInstanceUID, in true z order."""
    write(root / "loc" / "a", phantom(99), study=study, series=f"{study}.1", patient_id=patient_id, age=age,
          image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=(0, 1, 0, 0, 0, -1))
    write(root / "cta" / "a", phantom(98), study=study, series=f"{study}.3", patient_id=patient_id, age=age,
          contrast="IOPAMIDOL", z=0.0)
    write(root / "cor" / "a", phantom(97), study=study, series=f"{study}.4", patient_id=patient_id, age=age,
          orientation=(1, 0, 0, 0, 0, -1))
    ordered: dict[str, np.ndarray] = {}
    zs = [10.0, 15.0, 20.0, 25.0, 30.0]
    for i, z in enumerate(zs):
        hu = phantom(i)
        zz = -z if descending else z
        sop = write(root / "ax" / f"im{(7 * i) % 5}", hu, study=study, series=f"{study}.2", z=zz,
                    instance=5 - i, patient_id=patient_id, age=age, unsigned12=unsigned12,
                    sop=f"{study}.2.{i}")
        ordered[sop] = hu
    if descending:
        ordered = dict(reversed(list(ordered.items())))
    return ordered


@pytest.mark.parametrize(("unsigned12", "descending"), [(False, False), (True, False), (True, True)])
def test_selects_axial_series_orders_by_position_and_keeps_hu_exact(
    tmp_path: Path, ct_writer: Callable[..., str], unsigned12: bool, descending: bool
) -> None:
    truth = make_study(tmp_path / "src", ct_writer, unsigned12=unsigned12, descending=descending)
    report = ingest(tmp_path / "src", tmp_path / "out", CFG, progress=False).report
    assert report["series_skipped"] == {"contrast": 1, "localizer": 1, "non_axial": 1}
    rows = read_slices(tmp_path / "out")
    assert [r["slice_index"] for r in rows] == list(range(5))
    assert [r["z_mm"] for r in rows] == sorted(r["z_mm"] for r in rows)
    for row, hu in zip(rows, truth.values(), strict=True):
        np.testing.assert_array_equal(hu_of(row), hu)


def test_schema_and_storage_layout(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src", ct_writer)
    ingest(tmp_path / "src", tmp_path / "out", CFG, progress=False)
    (path,) = (tmp_path / "out" / "slices").glob("*.parquet")
    pf = pq.ParquetFile(path)
    assert pf.schema_arrow.remove_metadata() == SLICE_SCHEMA.remove_metadata()
    assert pf.metadata.num_row_groups == 5  # one slice per row group
    assert pf.metadata.row_group(0).column(10).compression == "ZSTD"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["slices"] for s in manifest["scans"]] == [5]


def test_duplicates_are_written_once(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src", ct_writer)
    shutil.copytree(tmp_path / "src" / "ax", tmp_path / "src" / "zz_copy_of_ax")
    report = ingest(tmp_path / "src", tmp_path / "out", CFG, progress=False).report
    assert report["slices_written"] == 5 and len(report["duplicates"]) == 5
    located = locate(tmp_path / "src", tmp_path / "out")
    assert all(r["file"].startswith("zz_copy_of_ax/") and r["reason"].startswith("duplicate of ax/") for r in located)


# --- exclusions (paper Figure 2) ---------------------------------------------------------------------


def test_exclusions_follow_the_paper(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    src = tmp_path / "src"
    make_study(src / "keep", ct_writer, study="1.2.3.1", patient_id="P1")
    make_study(src / "child", ct_writer, study="1.2.3.2", patient_id="P2", age="005Y")
    make_study(src / "postop", ct_writer, study="1.2.3.3", patient_id="P3")
    ct_writer(src / "cta_only" / "a", phantom(1), study="1.2.3.4", series="1.2.3.4.1", contrast="IOHEXOL")
    (tmp_path / "clinical.csv").write_text(
        "study_instance_uid,postoperative\n1.2.3.1,false\n1.2.3.2,no\n1.2.3.3,TRUE\n1.2.3.4,0\n"
    )
    report = ingest(src, tmp_path / "out", CFG, clinical_csv=tmp_path / "clinical.csv", progress=False).report
    assert report["studies_found"] == 4
    assert report["excluded"] == {"postoperative": 1, "not_head_ct": 0, "no_noncontrast_axial_series": 1,
                                  "age_lt_7": 1}
    assert report["scans_written"] == 1 and report["slices_written"] == 5
    assert len({e["scan_id"] for e in report["excluded_scans"]}) == 3
    flow = (tmp_path / "out" / "ingest_report.md").read_text()
    assert "4 studies found" in flow and "1  patient younger than 7" in flow


def test_clinical_csv_errors_name_the_line(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src", ct_writer)
    bad = tmp_path / "clinical.csv"
    bad.write_text("study_instance_uid,postoperative\n1.2.3.1,maybe\n")
    with pytest.raises(ValueError, match=r"line 2: postoperative must be true/false"):
        ingest(tmp_path / "src", tmp_path / "out", CFG, clinical_csv=bad, progress=False)
    bad.write_text("study,postop\n")
    with pytest.raises(ValueError, match="missing column"):
        ingest(tmp_path / "src", tmp_path / "out", CFG, clinical_csv=bad, progress=False)
    bad.write_text("study_instance_uid,postoperative\n1.2.3.1,yes\n1.2.3.9,no\n1.2.3.1,0\n")
    with pytest.raises(ValueError, match="lines 2 and 4 say different things"):
        ingest(tmp_path / "src", tmp_path / "out", CFG, clinical_csv=bad, progress=False)
    assert not (tmp_path / "out").exists() and not key_path_for(tmp_path / "out").exists()  # nothing written


def test_wrong_arguments_are_refused_before_anything_is_written(tmp_path: Path, ct_writer: Callable[..., str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        ingest(tmp_path / "nope", out, CFG, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files under"):
        ingest(tmp_path / "empty", out, CFG, progress=False)
    make_study(tmp_path / "src", ct_writer)
    with pytest.raises(FileNotFoundError, match="clinical list"):
        ingest(tmp_path / "src", out, CFG, clinical_csv=tmp_path / "nope.csv", progress=False)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        ingest(tmp_path / "src", out, replace(CFG, workers=0), progress=False)
    assert not out.exists() and not key_path_for(out).exists()
    # another key into an output ingested under the first: refused, not silently re-pseudonymised
    monkeypatch.setenv(KEY_ENV, "a" * 32)
    ingest(tmp_path / "src", out, CFG, progress=False)
    monkeypatch.setenv(KEY_ENV, "b" * 32)
    with pytest.raises(ValueError, match="another pseudonym key"):
        ingest(tmp_path / "src", out, CFG, progress=False)


def test_scans_the_source_no_longer_yields_are_removed_and_said(tmp_path: Path, ct_writer: Callable[..., str],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1", patient_id="P1")
    make_study(tmp_path / "src" / "s2", ct_writer, study="1.2.3.2", patient_id="P2")
    ingest(tmp_path / "src", tmp_path / "out", CFG, progress=False)
    shutil.rmtree(tmp_path / "src" / "s2")
    result = ingest(tmp_path / "src", tmp_path / "out", CFG, progress=False)
    assert result.report["stale_scans_removed"] == 1 and len(list((tmp_path / "out" / "slices").iterdir())) == 1
    assert "removed 1 scans this source no longer yields" in result.summary() and "removed 1 scans" in caplog.text


# --- de-identification -------------------------------------------------------------------------------


def test_no_identifier_reaches_any_output(tmp_path: Path, ct_writer: Callable[..., str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    truth = make_study(tmp_path / "src", ct_writer, study="1.2.840.99.7", patient_id="MRN-55501")
    shutil.copy(real_file("J2K_pixelrep_mismatch.dcm"), tmp_path / "src" / "real.dcm")
    # an export that names folders by patient ID and files by SOPInstanceUID: a non-CT file and a duplicate
    mr = pydicom.dcmread(real_file("MR_small.dcm"), stop_before_pixels=True)
    (tmp_path / "src" / "MRN-55501").mkdir()
    shutil.copy(real_file("MR_small.dcm"), tmp_path / "src" / "MRN-55501" / f"{mr.SOPInstanceUID}.dcm")
    first_sop, first_file = next(iter(truth)), sorted((tmp_path / "src" / "ax").iterdir())[0]
    shutil.copy(first_file, tmp_path / "src" / "MRN-55501" / f"{pydicom.dcmread(first_file).SOPInstanceUID}.dcm")
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        report = ingest(tmp_path / "src", out, CFG, progress=False).report
    assert report["quarantined"] and report["duplicates"]
    real = pydicom.dcmread(real_file("J2K_pixelrep_mismatch.dcm"), stop_before_pixels=True)
    secrets = [*IDENTIFIERS.values(), "MRN-55501", "1.2.840.99.7", *truth, first_sop, str(mr.SOPInstanceUID),
               str(real.PatientID), str(real.StudyInstanceUID), str(real.SOPInstanceUID)]
    texts = []
    for f in out.rglob("*"):
        if f.suffix == ".parquet":
            t = pq.read_table(f)
            texts.append(str(t.drop(["hu"]).to_pylist()) + str(t.schema.metadata))
        elif f.is_file():
            texts.append(f.read_text())
    blob = "\n".join([*texts, caplog.text])
    leaked = [s for s in secrets if s in blob]
    assert not leaked
    assert not (out / key_path_for(out).name).exists() and key_path_for(out).exists()
    assert key_path_for(out).read_text() not in blob


def test_pseudonyms_are_keyed(tmp_path: Path, ct_writer: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    make_study(tmp_path / "src", ct_writer)
    monkeypatch.setenv(KEY_ENV, "a" * 32)
    a = read_slices(ingest(tmp_path / "src", tmp_path / "a", CFG, progress=False).out)
    b = read_slices(ingest(tmp_path / "src", tmp_path / "b", CFG, progress=False).out)
    monkeypatch.setenv(KEY_ENV, "b" * 32)
    c = read_slices(ingest(tmp_path / "src", tmp_path / "c", CFG, progress=False).out)
    assert [r["instance_key"] for r in a] == [r["instance_key"] for r in b]
    assert {r["scan_id"] for r in a}.isdisjoint({r["scan_id"] for r in c})
    assert not key_path_for(tmp_path / "a").exists()  # env key: no key file written


# --- idempotency and interruption --------------------------------------------------------------------


def test_rerun_is_idempotent_and_completes_a_killed_run(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1", patient_id="P1")
    make_study(tmp_path / "src" / "s2", ct_writer, study="1.2.3.2", patient_id="P2")
    out = tmp_path / "out"
    first = ingest(tmp_path / "src", out, CFG, progress=False).report
    files = sorted((out / "slices").glob("*.parquet"))
    before = {p.name: p.read_bytes() for p in files}
    second = ingest(tmp_path / "src", out, CFG, progress=False).report
    assert second["scans_reused"] == 2 and second["slices_written"] == first["slices_written"] == 10
    assert {p.name: p.read_bytes() for p in sorted((out / "slices").glob("*.parquet"))} == before
    # a killed run: one scan never written, a half-written temporary left behind
    files[0].unlink()
    (out / "slices" / f".{files[0].name}.4242.tmp").write_bytes(b"PAR1 half")
    third = ingest(tmp_path / "src", out, CFG, progress=False).report
    assert third["scans_reused"] == 1 and third["slices_written"] == 10
    assert {p.name: p.read_bytes() for p in sorted((out / "slices").glob("*.parquet"))} == before
    assert not list((out / "slices").glob(".*"))
    assert third["dataset_fingerprint"] == first["dataset_fingerprint"]


def test_a_scan_that_lost_a_slice_is_redone_and_reported_again(tmp_path: Path,
                                                                ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src", ct_writer)
    victim = sorted((tmp_path / "src" / "ax").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])  # pixel data cut short
    out = tmp_path / "out"
    first = ingest(tmp_path / "src", out, CFG, progress=False).report
    lost = [r["file"] for r in locate(tmp_path / "src", out)]
    assert first["slices_written"] == 4 and lost == [victim.relative_to(tmp_path / "src").as_posix()]
    second = ingest(tmp_path / "src", out, CFG, progress=False).report
    assert second["quarantined"] == first["quarantined"] and second["scans_reused"] == 0
    assert second["slices_written"] == 4 and second["dataset_fingerprint"] == first["dataset_fingerprint"]
    victim.write_bytes(data)  # fixed in place
    third = ingest(tmp_path / "src", out, CFG, progress=False).report
    assert third["slices_written"] == 5 and not third["quarantined"]
    assert ingest(tmp_path / "src", out, CFG, progress=False).report["scans_reused"] == 1


def test_slices_are_located_by_their_instance_key(tmp_path: Path, ct_writer: Callable[..., str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    truth = make_study(tmp_path / "src", ct_writer)
    out = tmp_path / "out"
    ingest(tmp_path / "src", out, CFG, progress=False)
    rows = read_slices(out)
    keys = [r["instance_key"] for r in rows]
    located = locate_slices(tmp_path / "src", out, [*keys, "0" * 24])
    assert located.pop("0" * 24) is None
    for key, sop in zip(keys, truth, strict=True):  # rows in z order, truth in z order
        assert pydicom.dcmread(tmp_path / "src" / located[key]).SOPInstanceUID == sop
    (tmp_path / "review.csv").write_text("scan_id,instance_key\nx," + keys[0] + "\n")
    assert cli.main(["locate", str(tmp_path / "src"), str(out), "--slices", str(tmp_path / "review.csv")]) == 0
    assert capsys.readouterr().out.strip() == f"{keys[0]}\t{located[keys[0]]}"


def test_two_workers_give_the_same_dataset(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1", patient_id="P1")
    make_study(tmp_path / "src" / "s2", ct_writer, study="1.2.3.2", patient_id="P2")
    one = ingest(tmp_path / "src", tmp_path / "one", CFG, progress=False)
    shutil.copy(key_path_for(tmp_path / "one"), key_path_for(tmp_path / "two"))
    two = ingest(tmp_path / "src", tmp_path / "two", replace(CFG, workers=2), progress=False)
    assert one.report["dataset_fingerprint"] == two.report["dataset_fingerprint"]


def test_a_dead_worker_pool_stops_the_run_with_a_clear_error(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    """A script without a main guard makes every worker die at start: that is not the files' fault, so the run
    stops and says how to fix it, instead of quarantining every file."""
    make_study(tmp_path / "src", ct_writer)
    script = tmp_path / "unguarded.py"
    script.write_text("from blendsign.config import IngestConfig\nfrom blendsign.ingest import ingest\n"
                      f"ingest({str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, IngestConfig(workers=2), "
                      "progress=False)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, KEY_ENV: "dead-pool-key-0123456789abcdef"})
    assert run.returncode != 0
    assert "worker pool died" in run.stderr and "__main__" in run.stderr
    assert not list((tmp_path / "out" / "slices").glob("*.parquet"))


def test_killing_the_main_process_ends_its_workers(tmp_path: Path) -> None:
    """SIGKILL of the process that made the ingest pool (the OOM killer, ``kill -9``) ends the fork server and
    every worker within seconds: none is left waiting on its task queue for ever."""
    import signal
    import time

    script = tmp_path / "pool.py"
    script.write_text("import time\nfrom blendsign import ingest\nif __name__ == '__main__':\n"
                      "    pool = ingest._pool(2)\n    [f.result() for f in [pool.submit(time.sleep, 0.1) "
                      "for _ in range(4)]]\n    print('ready', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def group() -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    assert len(group()) >= 3  # main, fork server, two workers (and the resource tracker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while (left := group()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"{len(left)} processes outlived the killed main process"


# --- hostile and broken sources -----------------------------------------------------------------------------


def test_a_named_pipe_is_reported_and_never_opened(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1")
    os.mkfifo(tmp_path / "src" / "s1" / "pipe")  # opening it for reading would block forever
    report = ingest(tmp_path / "src", tmp_path / "out", replace(CFG, workers=1), progress=False).report
    assert report["scans_written"] == 1
    rows = {r["file"]: r["reason"] for r in locate(tmp_path / "src", tmp_path / "out")}
    assert rows == {"s1/pipe": "not a regular file (named pipe): not read"}


def test_an_unreadable_folder_is_reported_not_dropped(tmp_path: Path, ct_writer: Callable[..., str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1")
    make_study(tmp_path / "src" / "s2", ct_writer, study="1.2.3.2", patient_id="P2")
    locked = tmp_path / "src" / "s2"
    if os.geteuid() == 0:  # root reads a chmod-000 folder anyway: make listing it fail as it would for a user
        real_scandir = os.scandir

        def scandir(path: str | os.PathLike[str] = ".") -> Iterator[os.DirEntry[str]]:
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        locked.chmod(0)
    try:
        report = ingest(tmp_path / "src", tmp_path / "out", replace(CFG, workers=1), progress=False).report
        rows = {r["file"]: r["reason"] for r in locate(tmp_path / "src", tmp_path / "out")}
    finally:
        locked.chmod(0o755)
    assert report["scans_written"] == 1
    assert rows == {"s2": "folder cannot be read (Permission denied): its files were not ingested"}
    assert "folder cannot be read" in (tmp_path / "out" / "ingest_report.md").read_text()


def test_a_killed_reingest_leaves_an_output_no_later_stage_reads(tmp_path: Path, ct_writer: Callable[..., str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from blendsign import ingest as ingest_module
    from blendsign.labels import read_ingested_slices

    cfg = replace(CFG, workers=1)
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1", patient_id="P1")
    out = tmp_path / "out"
    ingest(tmp_path / "src", out, cfg, progress=False)
    assert (out / "_SUCCESS").is_file() and len(read_ingested_slices(out)[0]) == 5
    make_study(tmp_path / "src" / "s2", ct_writer, study="1.2.3.2", patient_id="P2")

    def killed(task: object) -> object:
        raise KeyboardInterrupt  # the run dies after the old manifest, before the new one

    monkeypatch.setattr(ingest_module, "write_scan", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest(tmp_path / "src", out, cfg, progress=False)
    assert (out / "manifest.json").is_file() and not (out / "_SUCCESS").exists()
    with pytest.raises(FileNotFoundError, match="not a complete ingest output"):
        read_ingested_slices(out)
    monkeypatch.undo()
    ingest(tmp_path / "src", out, cfg, progress=False)
    assert len(read_ingested_slices(out)[0]) == 10


def test_the_flow_report_adds_up_and_names_failed_scans(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1", patient_id="P1")
    make_study(tmp_path / "src" / "s2", ct_writer, study="1.2.3.2", patient_id="P2")
    make_study(tmp_path / "src" / "s3", ct_writer, study="1.2.3.3", patient_id="P3", age="003Y")
    for p in (tmp_path / "src" / "s2" / "ax").iterdir():  # every slice of s2's axial series cut inside its pixels
        p.write_bytes(p.read_bytes()[:-100])
    report = ingest(tmp_path / "src", tmp_path / "out", replace(CFG, workers=1), progress=False).report
    assert (report["studies_found"], sum(report["excluded"].values()), len(report["scans_failed"]),
            report["scans_written"]) == (3, 1, 1, 1)
    md = (tmp_path / "out" / "ingest_report.md").read_text()
    assert "1 scans written, 5 slices = 3 − 1 − 1" in md
    assert f"| `{report['scans_failed'][0]['scan_id']}` | no slice of the scan could be decoded |" in md


def test_sources_are_fingerprinted_by_content_not_by_names_or_mtimes(tmp_path: Path,
                                                                     ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1", patient_id="P1")
    out = tmp_path / "out"
    first = ingest(tmp_path / "src", out, CFG, progress=False).report
    copy = tmp_path / "copy"  # a re-upload: other file names, every mtime new
    for i, p in enumerate(sorted(p for p in (tmp_path / "src").rglob("*") if p.is_file())):
        (copy / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (copy / f"d{i % 2}" / f"f{i}").write_bytes(p.read_bytes())
    again = ingest(copy, out, CFG, progress=False).report
    assert again["scans_reused"] == 1 and again["dataset_fingerprint"] == first["dataset_fingerprint"]
    one = copy / "d0" / "f0"  # s1/ax/im0: a slice of the scan
    data = bytearray(one.read_bytes())
    data[-1] ^= 1  # one pixel's bit: a new dataset
    one.write_bytes(bytes(data))
    changed = ingest(copy, out, CFG, progress=False).report
    assert changed["dataset_fingerprint"] != first["dataset_fingerprint"]


def test_an_output_digested_with_another_algorithm_is_rewritten_once_and_reuse_decodes_nothing(
        tmp_path: Path, ct_writer: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An output whose files were digested with another algorithm (SHA-256 on 2026-12-03, BLAKE2b before) is
    rewritten, not wrongly reused; then its scans are reused by their files' bytes alone, without decoding a pixel."""
    from blendsign import ingest as ingest_module

    monkeypatch.setenv(KEY_ENV, "one-key-for-both-outputs")
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1", patient_id="P1")
    make_study(tmp_path / "src" / "s2", ct_writer, study="1.2.3.2", patient_id="P2")
    cfg, out = replace(CFG, workers=1), tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(ingest_module, "CONTENT_DIGEST", "sha256")
        old = ingest(tmp_path / "src", out, cfg, progress=False).report
    fresh = ingest(tmp_path / "src", tmp_path / "fresh", cfg, progress=False).report
    again = ingest(tmp_path / "src", out, cfg, progress=False).report
    assert again["scans_reused"] == 0 and again["scans_written"] == old["scans_written"] == 2
    assert again["dataset_fingerprint"] == fresh["dataset_fingerprint"] != old["dataset_fingerprint"]
    assert read_slices(out) == read_slices(tmp_path / "fresh")

    def no_decoding(*args: object) -> object:
        raise AssertionError("a reused scan was decoded")

    monkeypatch.setattr(ingest_module, "read_hu", no_decoding)
    third = ingest(tmp_path / "src", out, cfg, progress=False).report
    assert third["scans_reused"] == 2 and third["dataset_fingerprint"] == fresh["dataset_fingerprint"]


def test_an_abdominal_ct_is_not_ingested_as_a_head_scan(tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    make_study(tmp_path / "src" / "head", ct_writer, study="1.2.3.1", patient_id="P1")
    for i, z in enumerate((0.0, 5.0, 10.0)):
        ct_writer(tmp_path / "src" / "abd" / f"im{i}", phantom(i), study="1.2.3.9", series="1.2.3.9.2", z=z,
                  patient_id="P9", BodyPartExamined="ABDOMEN", StudyDescription="CT ABDOMEN PELVIS")
    for i, z in enumerate((0.0, 5.0)):  # no body part, a description in German
        ct_writer(tmp_path / "src" / "bauch" / f"im{i}", phantom(i), study="1.2.3.8", series="1.2.3.8.2", z=z,
                  patient_id="P8", SeriesDescription="Abdomen nativ 5mm")
    out = tmp_path / "out"
    report = ingest(tmp_path / "src", out, CFG, progress=False).report
    assert report["scans_written"] == 1 and report["excluded"]["not_head_ct"] == 2
    assert report["series_skipped"]["not_head"] == 2
    md = (out / "ingest_report.md").read_text()
    assert "├─    2  not a head CT" in md and "| series skipped: not a head CT (ingest.head rules) | 2 |" in md
    site = tmp_path / "site.toml"  # a site that scans abdomens too turns the rule off
    site.write_text("[ingest.head]\nrequired = false\n")
    from blendsign.config import load_preset

    assert ingest(tmp_path / "src", out, load_preset(str(site)).ingest, progress=False).report["scans_written"] == 3


# --- multi-frame CT ----------------------------------------------------------------------------------------------


def legacy_enhanced(files: list[Path], out: Path) -> None:
    """highdicom's legacy converter: one Legacy Converted Enhanced CT object from single-frame CT files."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    datasets = []
    for f in files:
        ds = pydicom.dcmread(f)
        # attributes the converter's modules require and write_ct leaves out
        for key, value in {"Manufacturer": "blendsign-test", "StudyTime": "120000", "StudyID": "1",
                           "PatientSex": "O", "FrameOfReferenceUID": "1.2.3.4.5", "PositionReferenceIndicator": "",
                           "SeriesDate": "20200314", "SeriesTime": "120000", "ContentDate": "20200314",
                           "ContentTime": "120000", "AcquisitionNumber": 1, "KVP": 120, "RescaleType": "HU"}.items():
            setattr(ds, key, value)
        datasets.append(ds)
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=generate_uid(), series_number=3, sop_instance_uid=generate_uid(),
        instance_number=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(out)


def test_a_series_as_one_enhanced_ct_object_gives_the_same_rows_as_its_single_frame_files(
        tmp_path: Path, ct_writer: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "one-key-for-both-outputs")
    singles = tmp_path / "singles"
    expected = make_study(singles, ct_writer, study="1.2.3.1", patient_id="P1")
    ax = sorted((singles / "ax").iterdir())
    for i, f in enumerate(ax):  # per-frame rescale: each file its own intercept (the same HU stored otherwise)
        ds = pydicom.dcmread(f)
        ds.RescaleIntercept = -10 * i
        ds.PixelData = (ds.pixel_array.astype(np.int32) + 10 * i).astype(np.int16).tobytes()
        ds.save_as(f)
    multi = tmp_path / "multi"
    legacy_enhanced(ax, multi / "series.dcm")
    assert pydicom.dcmread(multi / "series.dcm").NumberOfFrames == 5
    rows = {}
    for name, src in (("singles", singles / "ax"), ("multi", multi)):
        ingest(src, tmp_path / f"out-{name}", CFG, progress=False)
        rows[name] = read_slices(tmp_path / f"out-{name}")
    strip = [{k: v for k, v in r.items() if k != "transfer_syntax"} for r in rows["multi"]]
    assert strip == [{k: v for k, v in r.items() if k != "transfer_syntax"} for r in rows["singles"]]
    for row, hu in zip(rows["multi"], expected.values(), strict=True):  # z order, HU exact
        np.testing.assert_array_equal(hu_of(row), hu)


def test_a_compressed_frame_larger_than_its_header_is_refused_before_decoding(
        tmp_path: Path, ct_writer: Callable[..., str]) -> None:
    """An Enhanced CT object in JPEG-LS whose third frame declares 16384² (its SOF55 marker) behind a 16×20 header:
    that frame is refused with the reason, before the decoder would allocate it; the other frames are ingested."""
    from pydicom import encaps, uid

    make_study(tmp_path / "singles", ct_writer)
    legacy_enhanced(sorted((tmp_path / "singles" / "ax").iterdir()), tmp_path / "multi.dcm")
    ds = pydicom.dcmread(tmp_path / "multi.dcm")
    ds.compress(uid.JPEGLSLossless, generate_instance_uid=False)
    frames = list(encaps.generate_frames(ds.PixelData, number_of_frames=5))
    at = frames[2].find(b"\xff\xf7")  # SOF55: length (2), precision (1), Y (2), X (2)
    bomb = bytearray(frames[2])
    bomb[at + 5 : at + 9] = (16384).to_bytes(2, "big") * 2
    frames[2] = bytes(bomb)
    ds.PixelData = encaps.encapsulate(frames, has_bot=True)
    (tmp_path / "src").mkdir()
    ds.save_as(tmp_path / "src" / "series.dcm")
    ingest(tmp_path / "src", tmp_path / "out", CFG, progress=False)
    (row,) = locate(tmp_path / "src", tmp_path / "out")
    assert row["file"] == "series.dcm"
    assert "frame 3 cannot be decoded" in row["reason"]
    assert "declares 16384x16384 pixels but the DICOM header says 16x20" in row["reason"]
    assert len(read_slices(tmp_path / "out")) == 4


def test_a_perfusion_map_is_set_aside_as_derived(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(real_file("eCT_Supplemental.dcm"), src / "perfusion")  # pydicom-data: Enhanced CT, rCBF map
    report = ingest(src, tmp_path / "out", RELAXED, progress=False).report
    assert report["series_skipped"] == {"derived": 1} and report["scans_written"] == 0
    assert "| series skipped: derived or secondary (MIP, reformat, perfusion map, screen save, …) | 1 |" in (
        tmp_path / "out" / "ingest_report.md").read_text()


def test_locate_escapes_control_characters_of_file_names(tmp_path: Path, ct_writer: Callable[..., str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    make_study(tmp_path / "src" / "s1", ct_writer, study="1.2.3.1")
    (tmp_path / "src" / "notes\tfrom\nexport").write_text("not DICOM")
    ingest(tmp_path / "src", tmp_path / "out", replace(CFG, workers=1), progress=False)
    capsys.readouterr()
    assert cli.main(["locate", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("notes\\tfrom\\nexport\tnot a DICOM file\tfile-")


def test_hu_is_stored_as_two_byte_planes() -> None:
    hu = np.array([[-1024, 40], [255, 3000]], dtype=np.int16)  # 0xFC00, 0x0028, 0x00FF, 0x0BB8
    value = encode_hu(hu)
    assert value == bytes([0x00, 0x28, 0xFF, 0xB8, 0xFC, 0x00, 0x00, 0x0B])  # the low bytes, then the high bytes
    assert np.array_equal(decode_hu(value, 2, 2), hu) and decode_hu(value, 2, 2).dtype == np.int16
    with pytest.raises(InputError, match="8 bytes cannot be 2×3 int16 pixels"):
        decode_hu(value, 2, 3)
