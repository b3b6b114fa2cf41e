"""blendsign.nifti: small NIfTI volumes and masks made with nibabel, through import → ingest → fuse."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from blendsign.cli import main
from blendsign.config import IngestConfig
from blendsign.ingest import decode_hu, ingest
from blendsign.labels import fuse
from blendsign.nifti import import_nifti, mask_boxes, slice_geometry

# RAS+ affine: 0.5 mm along i, 0.6 mm along j, 5 mm slices, origin (10, 20, -30)
AFFINE = np.array([[0.5, 0, 0, 10.0], [0, 0.6, 0, 20.0], [0, 0, 5.0, -30.0], [0, 0, 0, 1]])
SHAPE = (20, 24, 4)  # i (columns), j (rows), k (slices)


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=SHAPE).astype(np.int16)


def blood_mask() -> np.ndarray:
    m = np.zeros(SHAPE, dtype=np.uint8)
    m[2:5, 3:7, 1] = 1  # slice 1: two regions, i 2–4 × j 3–6 and i 10–11 × j 15–19
    m[10:12, 15:20, 1] = 2
    m[6, 8, 2] = 3  # slice 2: one voxel (BHSD's class values are any non-zero)
    return m


def write_set(root: Path, names: tuple[str, ...] = ("049",)) -> tuple[Path, Path]:
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, name in enumerate(names):
        nib.save(nib.Nifti1Image(volume(i), AFFINE), root / "ct_scans" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(blood_mask(), AFFINE), root / "masks" / f"{name}.nii.gz")
    return root / "ct_scans", root / "masks"


def test_slice_geometry_maps_ras_to_lps() -> None:
    orientation, position, spacing, thickness = slice_geometry(AFFINE, 3)
    assert orientation == [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]  # +i is patient left→right: −x in LPS
    assert position == [-10.0, -20.0, -15.0] and spacing == [0.6, 0.5] and thickness == 5.0


def test_mask_boxes_are_the_components_with_continuous_edges() -> None:
    m = blood_mask()[:, :, 1].T  # [rows j, cols i]
    assert mask_boxes(m) == [(2.0, 3.0, 5.0, 7.0), (10.0, 15.0, 12.0, 20.0)]
    assert mask_boxes(np.zeros((4, 4))) == []


def test_a_nifti_set_imports_ingests_and_fuses_to_its_hu_geometry_and_boxes(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLENDSIGN_PSEUDONYM_KEY", "nifti-test-key-0123456789")
    volumes, masks = write_set(tmp_path / "ct-ich")
    result = import_nifti(volumes, tmp_path / "dicom", masks=masks, annotations_out=tmp_path / "ann.csv",
                          dataset="ct-ich", progress=False)
    assert (result.scans, result.slices, result.boxes, result.slices_with_blood) == (1, 4, 3, 2)
    ds = pydicom.dcmread(tmp_path / "dicom" / "049" / "0001.dcm")
    assert ds.BodyPartExamined == "HEAD" and ds.PatientID == "ct-ich-049"

    report = ingest(tmp_path / "dicom", tmp_path / "ingest", IngestConfig(), progress=False).report
    assert report["scans_written"] == 1 and report["slices_written"] == 4 and report["age_unknown_scans"] == 1
    rows = sorted(pq.read_table(tmp_path / "ingest" / "slices").to_pylist(), key=lambda r: r["slice_index"])
    for k, row in enumerate(rows):
        hu = decode_hu(row["hu"], row["rows"], row["cols"])
        np.testing.assert_array_equal(hu, volume(0)[:, :, k].T)
        assert row["z_mm"] == -30.0 + 5 * k and row["pixel_spacing_mm"] == [0.6, 0.5]

    fuse(tmp_path / "ann.csv", tmp_path / "ingest", tmp_path / "labels")
    labels = sorted(pq.read_table(tmp_path / "labels" / "labels.parquet").to_pylist(), key=lambda r: r["slice_index"])
    assert [r["label"] for r in labels] == ["non_ich", "normal_ich", "normal_ich", "non_ich"]
    boxes = [(b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in labels[1]["boxes"]]
    assert boxes == [(2.0, 3.0, 5.0, 7.0), (10.0, 15.0, 12.0, 20.0)]
    again = import_nifti(volumes, tmp_path / "dicom", masks=masks, annotations_out=tmp_path / "ann2.csv",
                         dataset="ct-ich", progress=False)
    assert again.scans == 1 and (tmp_path / "ann2.csv").read_text() == (tmp_path / "ann.csv").read_text()


def test_broken_volumes_and_mismatched_masks_are_skipped_and_named(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    volumes, masks = write_set(tmp_path / "set", ("001", "002", "003"))
    (volumes / "002.nii.gz").write_bytes(b"not a NIfTI file")
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 4), np.uint8), AFFINE), masks / "003.nii.gz")
    (volumes / "004.nii").write_bytes(b"")  # and one without a mask at all
    rc = main(["import-nifti", str(volumes), str(tmp_path / "dicom"), "--masks", str(masks), "--annotations",
               str(tmp_path / "ann.csv"), "--dataset", "bhsd", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "imported 1 scans (4 slices, 2 with hemorrhage, 3 boxes)" in out, repr(out[:300])
    assert "skipped 002.nii.gz: " in out and "skipped 003.nii.gz: mask grid (5, 5, 4) does not match" \
        in out and "skipped 004.nii: no mask named 004" in out
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir()) == ["001"]
    with pytest.raises(ValueError, match="go together"):
        import_nifti(volumes, tmp_path / "x", masks=masks, progress=False)
    assert replace(IngestConfig()).head.required  # the imported series are head CTs by BodyPartExamined
