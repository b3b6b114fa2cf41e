"""Patient-level folds (blendsign.folds): leakage, coverage, balance, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blendsign import CLASSES
from blendsign.cli import main
from blendsign.config import FoldConfig
from blendsign.folds import assign_folds, make_folds, scan_table


def write_labels(folder: Path, slices: list[tuple[str, str, str]]) -> Path:
    """A ``labels.parquet`` with the columns ``make_folds`` reads: ``(scan_id, patient_key, label)``."""
    folder.mkdir(parents=True, exist_ok=True)
    scan, patient, label = zip(*slices, strict=True)
    pq.write_table(pa.table({"scan_id": scan, "patient_key": patient, "label": label}), folder / "labels.parquet")
    return folder


def cohort(n_patients: int, scans_per_patient: int = 2, slices_per_scan: int = 3) -> list[tuple[str, str, str]]:
    """Patient p's scans: every 5th patient has a blend-sign slice, every 2nd a normal ICH slice."""
    out = []
    for p in range(n_patients):
        for s in range(scans_per_patient):
            worst = "blend_sign" if p % 5 == 0 else "normal_ich" if p % 2 == 0 else "non_ich"
            out += [(f"s{p:03d}-{s}", f"p{p:03d}", "non_ich") for _ in range(slices_per_scan - 1)]
            out.append((f"s{p:03d}-{s}", f"p{p:03d}", worst))
    return out


patients_st = st.lists(  # per patient: per scan: per slice: class index
    st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=3), min_size=1, max_size=3),
    min_size=2, max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(patients=patients_st, k=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_no_patient_in_two_folds_and_every_scan_assigned(patients: list[list[list[int]]], k: int,
                                                         seed: int) -> None:
    slices = [(f"s{p}-{s}", f"p{p}", CLASSES[c]) for p, scans in enumerate(patients)
              for s, labels in enumerate(scans) for c in labels]
    scans = scan_table(pd.DataFrame(slices, columns=["scan_id", "patient_key", "label"]))
    k = min(k, len(patients))
    folds = assign_folds(scans, k, seed)
    assert len(folds) == len(scans) == sum(len(s) for s in patients)
    assert set(folds.tolist()) == set(range(k))  # every fold used, nothing else
    assert (scans.assign(fold=folds).groupby("patient_key")["fold"].nunique() == 1).all()
    assert (assign_folds(scans, k, seed) == folds).all()


def test_scan_label_is_worst_slice() -> None:
    labels = pd.DataFrame({"scan_id": ["b", "b", "a", "a", "c"], "patient_key": ["p", "p", "q", "q", "q"],
                           "label": ["normal_ich", "non_ich", "blend_sign", "normal_ich", "non_ich"]})
    assert scan_table(labels).to_dict("list") == {
        "scan_id": ["a", "b", "c"], "patient_key": ["q", "p", "q"],
        "scan_label": ["blend_sign", "normal_ich", "non_ich"]}
    with pytest.raises(ValueError, match="more than one patient_key"):
        scan_table(labels.assign(patient_key=["p", "q", "q", "q", "q"]))
    with pytest.raises(ValueError, match="unknown label"):
        scan_table(labels.assign(label="ich"))


def test_make_folds_outputs_and_balance(tmp_path: Path) -> None:
    labels = write_labels(tmp_path / "labels", cohort(50))
    result = make_folds(labels, tmp_path / "folds", FoldConfig(k=5, seed=3))
    folds = pq.read_table(tmp_path / "folds" / "folds.parquet").to_pandas()
    assert list(folds.columns) == ["scan_id", "patient_key", "scan_label", "fold"]
    assert folds["fold"].dtype == "int32" and len(folds) == 100 and result.scans == 100
    # 10 blend-sign patients, 20 normal-ICH, 20 non-ICH (2 scans each): spread evenly over 5 folds
    per_fold = pd.crosstab(folds["fold"], folds["scan_label"])
    assert per_fold["blend_sign"].tolist() == [4] * 5
    assert per_fold["normal_ich"].tolist() == [8] * 5 and per_fold["non_ich"].tolist() == [8] * 5
    table = json.loads((tmp_path / "folds" / "folds.json").read_text())["folds"]
    assert table == list(result.table) and table[0]["slices"] == 60 and table[0]["blend_sign"] == 4
    assert sum(row["non_ich"] for row in table) == 240
    md = (tmp_path / "folds" / "folds.md").read_text()
    assert "| fold | patients | scans | non_ich | normal_ich | blend_sign | slices |" in md
    assert "| **all** | 50 | 100 | 240 | 40 | 20 | 300 |" in md and "5 patient-level folds" in result.summary()
    assert "Warning" not in md


def test_a_fold_without_a_class_is_flagged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    labels = write_labels(tmp_path / "labels", cohort(50))
    make_folds(labels, tmp_path / "folds", FoldConfig(k=12, seed=3))  # 10 blend-sign patients over 12 folds
    md = (tmp_path / "folds" / "folds.md").read_text()
    assert md.count("holds no blend_sign slice") == 2 and caplog.text.count("holds no blend_sign slice") == 2


def test_make_folds_deterministic(tmp_path: Path) -> None:
    slices = cohort(23, scans_per_patient=1)
    make_folds(write_labels(tmp_path / "l1", slices), tmp_path / "a", FoldConfig(k=4, seed=7))
    make_folds(write_labels(tmp_path / "l1", slices), tmp_path / "b", FoldConfig(k=4, seed=7))
    make_folds(write_labels(tmp_path / "l2", slices[::-1]), tmp_path / "c", FoldConfig(k=4, seed=7))
    make_folds(write_labels(tmp_path / "l1", slices), tmp_path / "d", FoldConfig(k=4, seed=8))
    for name in ("folds.parquet", "folds.json", "folds.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()  # row order
    fold = [pq.read_table(tmp_path / d / "folds.parquet")["fold"].to_pylist() for d in ("a", "d")]
    assert fold[0] != fold[1]


@pytest.mark.parametrize("k", [1, 0, 4])
def test_make_folds_refuses_bad_k(tmp_path: Path, k: int) -> None:
    labels = write_labels(tmp_path / "labels", cohort(3))
    with pytest.raises(ValueError, match=r"2 ≤ k ≤ the number of patients \(3\)"):
        make_folds(labels, tmp_path / "folds", FoldConfig(k=k))
    assert not (tmp_path / "folds").exists()


def test_cli_folds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = write_labels(tmp_path / "labels", cohort(6))
    assert main(["folds", str(labels), str(tmp_path / "f"), "--k", "3", "--seed", "1"]) == 0
    assert "3 patient-level folds (seed 1)" in capsys.readouterr().out
    assert main(["folds", str(labels), str(tmp_path / "g"), "--k", "7"]) == 2
    assert main(["folds", str(tmp_path / "missing"), str(tmp_path / "h")]) == 2
