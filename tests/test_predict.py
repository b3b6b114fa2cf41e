"""``blendsign predict``: the registered model on files and folders, per slice and per scan (real head-CT DICOM)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest

from blendsign import CLASSES
from blendsign.predict import predict_paths
from tests.conftest import real_file
from tests.served import dicom_bytes


def test_predict_paths_groups_scans_without_uids(served: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "export"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    (folder / "a" / "one").write_bytes(dicom_bytes("CT_small.dcm"))
    (folder / "a" / "two.dcm").write_bytes(dicom_bytes("CT_small.dcm"))
    (folder / "b" / "x.dcm").write_bytes(dicom_bytes("693_UNCI.dcm"))
    (folder / "b" / "notes.txt").write_text("not DICOM")
    slices, scans = predict_paths(served["model_uri"], [folder], tracking_uri=served["uri"], chunk=2)
    assert list(slices["file"]) == ["a/one", "a/two.dcm", "b/notes.txt", "b/x.dcm"]
    assert list(slices["scan"]) == ["scan000", "scan000", "", "scan001"]
    by_scan = scans.set_index("scan")
    assert by_scan.loc["scan000", "slices"] == 2 and by_scan.loc["scan000", "errors"] == 0
    assert by_scan.loc["", "errors"] == 1
    p = slices.set_index("file")
    assert by_scan.loc["scan001", "max_p_blend_sign"] == pytest.approx(float(p.loc["b/x.dcm", "p_blend_sign"]))
    assert by_scan.loc["scan001", "max_p_ich"] == pytest.approx(1 - float(p.loc["b/x.dcm", "p_non_ich"]))
    text = slices.to_csv() + scans.to_csv()
    for name in ("CT_small.dcm", "693_UNCI.dcm"):
        ds = pydicom.dcmread(real_file(name), stop_before_pixels=True)
        assert str(ds.StudyInstanceUID) not in text and str(ds.SeriesInstanceUID) not in text


def test_cli_predict_prints_slices_and_scans(served: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from blendsign.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["uri"])
    files = [str(real_file("J2K_pixelrep_mismatch.dcm")), str(real_file("MR_small.dcm"))]
    assert main(["predict", "--model", served["model_uri"], "--json", *files]) == 0
    out = json.loads(capsys.readouterr().out)
    good, bad = out["slices"]
    assert good["error"] is None and good["label"] in CLASSES
    assert bad["error"] == "not a CT image (Modality MR)" and bad["p_blend_sign"] is None
    assert {s["scan"] for s in out["scans"]} == {"scan000", "scan001"}


def test_cli_predict_outside_a_checkout_names_the_missing_store_and_creates_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from blendsign.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(real_file("CT_small.dcm"))]) == 2
    assert "no MLflow store to resolve models:/blendsign@champion: MLFLOW_TRACKING_URI is not set" in caplog.text
    assert "--tracking-uri" in caplog.text
    assert os.listdir(tmp_path) == []  # no empty ./.blendsign/mlflow.db


def test_cli_predict_reads_a_downloaded_model_folder_without_a_store(
        served: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from blendsign.cli import main
    from blendsign.model_package import download

    folder = str(download(served["model_uri"], tmp_path / "model", tracking_uri=served["uri"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", folder, "--json", str(real_file("J2K_pixelrep_mismatch.dcm"))]) == 0
    assert json.loads(capsys.readouterr().out)["slices"][0]["error"] is None
    assert not (tmp_path / ".blendsign").exists()
