"""The synthetic cohort: real DICOM, exact HU truth, class ratio, reader agreement, exclusions, de-id bait."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.uid import RLELossless

from blendsign.cli import main
from blendsign.config import SynthConfig, load_preset
from blendsign.labels import category_kappas
from blendsign.synth import (
    ANNOTATION_COLUMNS,
    CLASSES,
    CT_IMAGE_STORAGE,
    EXCLUSIONS,
    HEMORRHAGE_TYPES,
    Grid,
    head_grid,
    hu_sha256,
    lesion_rates,
    plan_cohort,
    render_axial,
    synthesize,
    tissue_masks,
)

CI = load_preset("ci").synth


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return (ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)).astype(np.int16)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    result = synthesize(out, CI, progress=False)
    truth = pq.read_table(out / "truth.parquet").to_pylist()
    with open(out / "annotations.csv", newline="") as f:
        annotations = list(csv.DictReader(f))
    return out, result, truth, annotations


@pytest.fixture(scope="module")
def big_plan():
    """Plan only (no pixels) of 500 scans (≈3,500 slices): class ratio and reader agreement."""
    return plan_cohort(replace(CI, scans=500, seed=7))


# --- determinism ---------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_rerun_is_idempotent(written) -> None:
    out, *_ = written
    before = _hashes(out)
    stale = out / "dicom" / "st0999" / "se01" / "im0001.dcm"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old run")
    (out / "dicom" / "notes.txt").write_text("not ours")
    synthesize(out, CI, progress=False)
    assert not stale.exists()  # a file of an earlier, bigger run is gone
    (out / "dicom" / "notes.txt").unlink()  # a foreign file is left alone
    assert _hashes(out) == before
    assert not [p for p in out.rglob("*.tmp")]


def test_different_seed_different_files(tmp_path: Path) -> None:
    small = replace(CI, scans=1, excluded_age=0, excluded_contrast_only=0, excluded_postoperative=0)
    a, b = synthesize(tmp_path / "a", small, progress=False), synthesize(tmp_path / "b", replace(small, seed=1),
                                                                        progress=False)
    ha, hb = _hashes(a.out), _hashes(b.out)
    assert ha["truth.parquet"] != hb["truth.parquet"]
    assert not set(ha.values()) & set(hb.values())


# --- DICOM -----------------------------------------------------------------------------------------------


def test_every_file_is_ct_dicom_and_axial_hu_matches_truth(written) -> None:
    out, result, truth, _ = written
    files = [p for p in (out / "dicom").rglob("*") if p.is_file()]
    assert len(files) == result.files
    assert any(p.suffix == ".dcm" for p in files) and any(p.suffix == "" for p in files)
    syntaxes, representations = set(), set()
    for p in files:
        assert p.read_bytes()[128:132] == b"DICM"  # preamble + prefix: a DICOM file, not a bare dataset
        ds = pydicom.dcmread(p)
        assert ds.SOPClassUID == CT_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        representations.add((ds.PixelRepresentation, ds.BitsStored, int(ds.RescaleIntercept)))
        assert ds.pixel_array.shape == (CI.size, CI.size)
    assert syntaxes == {pydicom.uid.ExplicitVRLittleEndian, RLELossless}
    assert representations == {(0, 12, -1024), (1, 16, 0)}
    rle_rows = 0
    for row in truth:
        ds = pydicom.dcmread(out / row["file"])
        assert ds.SOPInstanceUID == row["sop_instance_uid"] and ds.InstanceNumber == row["instance_number"]
        assert hu_sha256(_hu(ds)) == row["hu_sha256"]
        rle_rows += ds.file_meta.TransferSyntaxUID == RLELossless
    assert rle_rows > 0


def test_series_layout(written) -> None:
    out, _, truth, _ = written
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for p in (out / "dicom").rglob("*"):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    annotated = {r["series_instance_uid"] for r in truth}
    kinds = set()
    for images in by_series.values():
        ds = images[0]
        orient = [float(v) for v in ds.ImageOrientationPatient]
        if "LOCALIZER" in ds.ImageType:
            kinds.add("localizer")
            assert orient != [1, 0, 0, 0, 1, 0] and len(images) <= 2
        elif orient == [1, 0, 0, 0, 1, 0]:
            kinds.add("contrast" if "ContrastBolusAgent" in ds else "axial")
            assert ds.SeriesInstanceUID in annotated or "ContrastBolusAgent" in ds
            zs = sorted(float(d.ImagePositionPatient[2]) for d in images)
            assert np.allclose(np.diff(zs), float(ds.SliceThickness)) and float(ds.SliceThickness) == 5
            assert sorted(d.InstanceNumber for d in images) == list(range(1, len(images) + 1))
        else:
            kinds.add("reformat")
    assert kinds == {"localizer", "axial", "contrast", "reformat"}


def test_scanner_variation_across_series() -> None:
    plan = plan_cohort(replace(CI, scans=40))
    axial = [se for s in plan.studies for se in s.series if se.kind == "axial"]
    in_z_order = [se.instance == tuple(range(1, len(se.instance) + 1)) for se in axial]
    descending = [se.instance == tuple(range(len(se.instance), 0, -1)) for se in axial]
    assert any(in_z_order) and any(descending) and not all(a or d for a, d in zip(in_z_order, descending,
                                                                                   strict=True))
    assert {se.storage for se in axial} == {"u12", "s16"}
    assert all(0.4 <= se.spacing_mm * CI.size / 512 <= 0.5 for se in axial)


# --- pixels ----------------------------------------------------------------------------------------------


def test_tissue_hu_ranges_at_512() -> None:
    study = next(s for s in plan_cohort(replace(CI, size=512, scans=3)).studies if not s.lesions)
    se = study.annotated_series
    hg = head_grid(study.head, Grid(512, se.spacing_mm))
    z = len(study.t) // 2
    hu = render_axial(hg, study.t[z], z, (), np.random.default_rng(0), noise_hu=CI.noise_hu,
                      hu_range=(-1024, 3071)).hu
    m = tissue_masks(hg, study.t[z])
    assert -1010 < np.median(hu[m["air"]]) < -990 and hu.min() >= -1024
    assert 700 <= np.median(hu[m["bone"]]) <= 1500 and np.percentile(hu[m["bone"]], 99) < 1700
    assert np.percentile(hu[m["brain"]], 5) >= 20 and np.percentile(hu[m["brain"]], 95) <= 45
    assert 0 <= np.median(hu[m["csf"] | m["ventricles"]]) <= 15
    m64 = tissue_masks(head_grid(study.head, Grid(64, se.spacing_mm * 8)), study.t[z])
    assert all(abs(m64[k].mean() - m[k].mean()) < 0.01 for k in m)  # same anatomy at 64 px (spacing × 8)


def _render(study, z: int, size: int):
    se = study.annotated_series
    return render_axial(head_grid(study.head, Grid(size, se.spacing_mm)), study.t[z], z, study.lesions,
                        np.random.default_rng(z), noise_hu=CI.noise_hu, hu_range=(-1024, 3071))


def test_blend_sign_has_two_parts_with_a_sharp_margin_and_mimics_do_not() -> None:
    plan = plan_cohort(replace(CI, scans=60))
    blend = [(s, z) for s in plan.studies for z in range(len(s.t)) if s.truth.cls[z] == 2]
    mimic = [(s, z) for s in plan.studies for z in range(len(s.t)) if s.truth.mimic[z]]
    assert blend and mimic
    for s, z in blend[:6]:
        r = _render(s, z, CI.size)
        (region,) = [g for g in r.regions if g.hypo is not None]
        hyper, hypo = region.mask & ~region.hypo, region.hypo
        assert np.median(r.hu[hyper]) - np.median(r.hu[hypo]) >= 18
        step = r.hu[:, 1:].astype(int) - r.hu[:, :-1]  # across the margin, between horizontal neighbours
        across = (hyper[:, 1:] & hypo[:, :-1]) | (hypo[:, 1:] & hyper[:, :-1])
        across_v = (hyper[1:] & hypo[:-1]) | (hypo[1:] & hyper[:-1])
        steps = np.concatenate([np.abs(step[across]), np.abs(np.diff(r.hu.astype(int), axis=0)[across_v])])
        assert np.median(steps) >= 12
    for s, z in mimic[:4]:
        r = _render(s, z, 512)
        (region,) = [g for g in r.regions if g.mimic]
        inner = region.mask[:, 1:] & region.mask[:, :-1]
        assert np.median(np.abs(np.diff(r.hu.astype(int), axis=1)[inner])) < 8  # no sharp margin: noise only
        assert s.truth.cls[z] == 1


def test_hemorrhage_types_and_boxes(written) -> None:
    _, _, truth, _ = written
    for row in truth:
        assert (row["label"] == "non_ich") == (not row["boxes"]) == (not row["hemorrhage_types"])
        for b in row["boxes"]:
            assert 0 <= b["x_min"] < b["x_max"] <= CI.size and 0 <= b["y_min"] < b["y_max"] <= CI.size
    plan = plan_cohort(replace(CI, scans=100))
    assert {les.kind for s in plan.studies for les in s.lesions} == set(HEMORRHAGE_TYPES)
    ivh = next((s, z) for s in plan.studies for les in s.lesions if les.kind == "IVH" for z in range(*les.z))
    study, z = ivh
    se = study.annotated_series
    hg = head_grid(study.head, Grid(CI.size, se.spacing_mm))
    region = next(g for g in _render(study, z, CI.size).regions if g.kind == "IVH")
    assert (region.mask & tissue_masks(hg, study.t[z])["ventricles"]).sum() >= 0.5 * region.mask.sum()


# --- class ratio and readers (plan level) --------------------------------------------------------------


def test_class_ratio_near_config(big_plan) -> None:
    cls = np.concatenate([s.truth.cls for s in big_plan.usable()])
    got = np.bincount(cls, minlength=3) / len(cls)
    want = np.asarray(CI.class_ratio) / sum(CI.class_ratio)
    assert np.allclose(got, want, atol=[0.03, 0.03, 0.01]), (got, want)
    rates = lesion_rates(replace(CI, class_ratio=(10.0, 9.0, 1.0)))
    assert rates.p_ich > lesion_rates(CI).p_ich  # probabilities follow the config, not constants


def test_reader_kappa_near_paper(big_plan) -> None:
    readers = np.concatenate([s.readers for s in big_plan.usable()])
    truth = np.concatenate([s.truth.cls for s in big_plan.usable()])
    counts = np.stack([(readers == j).sum(1) for j in range(3)], axis=1)
    kappa = category_kappas(counts)
    assert abs(kappa[0] - CI.reader_kappa[0]) < 0.07 and abs(kappa[2] - CI.reader_kappa[1]) < 0.07, kappa
    errors = [(readers[:, r] != truth).mean() for r in range(3)]
    assert errors[0] > max(errors[1], errors[2])  # 6 vs 11, 15 years of experience (error ∝ 1/years)
    on_blend = readers[truth == 2].ravel()
    assert (on_blend == 1).sum() > (on_blend == 0).sum()  # blend is mostly confused with normal ICH
    assert (readers[truth == 2] != 2).mean() > (readers[truth == 0] != 0).mean()


# --- exclusions, annotations, identifiers ------------------------------------------------------------------


def test_exclusion_studies(written) -> None:
    out, result, truth, _ = written
    assert sorted(r for _, r in result.exclusions) == sorted(EXCLUSIONS) and result.scans == CI.scans
    expected = {r["study_instance_uid"]: r["expected_exclusion"] for r in truth}
    assert len(expected) == CI.scans + len(EXCLUSIONS)
    with open(out / "clinical.csv", newline="") as f:
        clinical = list(csv.DictReader(f))
    assert list(clinical[0]) == ["study_instance_uid", "postoperative"]
    assert {r["study_instance_uid"] for r in clinical} == set(expected)
    for r in clinical:
        assert r["postoperative"] == ("true" if expected[r["study_instance_uid"]] == "postoperative" else "false")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in (out / "dicom").rglob("*") if p.is_file()]
    for uid, reason in expected.items():
        images = [d for d in headers if d.StudyInstanceUID == uid]
        ages = {int(d.PatientAge[:3]) for d in images}
        assert (ages == {5}) if reason == "age_lt_7" else all(a >= 18 for a in ages)
        non_localizer = [d for d in images if "LOCALIZER" not in d.ImageType]
        if reason == "no_noncontrast_axial_series":
            assert all("ContrastBolusAgent" in d for d in non_localizer)
        else:
            assert any("ContrastBolusAgent" not in d for d in non_localizer)


def test_annotation_csv(written) -> None:
    out, _, truth, annotations = written
    with open(out / "annotations.csv") as f:
        assert f.readline().strip() == ",".join(ANNOTATION_COLUMNS)
    by_slice: dict[str, dict[str, list[dict]]] = {}
    for a in annotations:
        assert a["label"] in CLASSES and a["reader"] in ("R1", "R2", "R3")
        by_slice.setdefault(a["sop_instance_uid"], {}).setdefault(a["reader"], []).append(a)
        box = [a[k] for k in ("x_min", "y_min", "x_max", "y_max")]
        if a["label"] == "non_ich":
            assert box == ["", "", "", ""]
        else:
            x0, y0, x1, y1 = map(int, box)
            assert 0 <= x0 < x1 <= CI.size and 0 <= y0 < y1 <= CI.size
    assert set(by_slice) == {r["sop_instance_uid"] for r in truth}
    assert all(set(readers) == {"R1", "R2", "R3"} for readers in by_slice.values())
    multi = [rows for readers in by_slice.values() for rows in readers.values() if len(rows) > 1]
    assert multi and all(len({r["label"] for r in rows}) == 1 for rows in multi)


def test_identifying_tags_present_but_not_in_paths(written) -> None:
    out, _, _, _ = written
    identifiers = set()
    for p in (out / "dicom").rglob("*"):
        if not p.is_file():
            continue
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "InstitutionName",
                    "InstitutionAddress", "ReferringPhysicianName", "AccessionNumber", "StudyDate", "StudyTime",
                    "StudyID"):
            assert str(ds.get(tag, "")).strip(), (tag, p)
        born, seen = (datetime.strptime(ds[k].value, "%Y%m%d").date() for k in ("PatientBirthDate", "StudyDate"))
        age = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
        assert ds.PatientAge == f"{age:03d}Y"
        identifiers |= {ds.PatientID, ds.AccessionNumber, ds.StudyID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                        ds.SOPInstanceUID, *str(ds.PatientName).split("^"), ds.StudyDate}
        rel = p.relative_to(out).as_posix()
        assert re.fullmatch(r"dicom/st\d{4}/se\d{2}/im\d{4}(\.dcm)?", rel), rel
    paths = " ".join(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert not [i for i in identifiers if i and i in paths]


def test_manifest_and_summary(written) -> None:
    out, result, truth, _ = written
    manifest = json.loads((out / "synth_manifest.json").read_text())
    assert manifest["seed"] == CI.seed and manifest["config"]["size"] == CI.size
    usable = [r["label"] for r in truth if r["expected_exclusion"] is None]
    assert manifest["class_counts"]["usable"] == {c: usable.count(c) for c in CLASSES}
    assert tuple(manifest["class_counts"]["usable"][c] for c in CLASSES) == result.class_counts
    text = result.summary()
    assert str(out) in text and "blend_sign" in text and "postoperative" in text


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path / "o"), "--config", "ci", "--scans", "1", "--seed", "3",
                 "--no-progress"]) == 0
    assert "1 usable scans" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "synth_manifest.json").read_text())["seed"] == 3


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unreachable"):
        lesion_rates(SynthConfig(class_ratio=(1.0, 9.0, 1.0), ich_span_share=0.3))
