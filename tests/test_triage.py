"""blendsign.triage: CQ500 reads, readers' κ, scan metrics in closed form, and a triage run through ingest."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from blendsign import cli
from blendsign.config import IngestConfig
from blendsign.deid import KEY_ENV
from blendsign.ingest import ingest
from blendsign.serving import DICOM_COLUMN, BlendSignModel
from blendsign.triage import FINDINGS, READERS, read_reads, reader_kappas, triage, triage_metrics
from tests.served import make_checkpoint

HEADER = "name,Category," + ",".join(f"{r}:{f}" for r in READERS for f in (*FINDINGS, "Fracture"))


def reads_row(name: str, ich: tuple[int, int, int], sdh: tuple[int, int, int] = (0, 0, 0)) -> str:
    cells = []
    for r in range(3):
        per = {"ICH": ich[r], "SDH": sdh[r]}
        cells += [str(per.get(f, 0)) for f in (*FINDINGS, "Fracture")]
    return ",".join([name, "B1", *cells])


def write_reads(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def test_reads_are_counted_per_finding_and_bad_rows_named(tmp_path: Path) -> None:
    reads = read_reads(write_reads(tmp_path / "reads.csv", [
        reads_row("CQ500-CT-0", (1, 1, 0), sdh=(1, 0, 0)), reads_row("CQ500-CT-1", (0, 0, 1))]))
    assert [(r.row, r.name, r.votes["ICH"], r.votes["SDH"]) for r in reads] == [
        (2, "CQ500-CT-0", 2, 1), (3, "CQ500-CT-1", 1, 0)]
    assert [r.gold("ICH") for r in reads] == [True, False]  # 2 of 3 is a majority, 1 of 3 is not
    bad = reads_row("CQ500-CT-2", (1, 1, 1)).replace(",1,", ",yes,", 1)
    write_reads(tmp_path / "bad.csv", [reads_row("CQ500-CT-0", (1, 1, 1)), reads_row("CQ500-CT-0", (0, 0, 0)),
                                       bad, reads_row("", (0, 0, 0))])
    with pytest.raises(ValueError) as err:
        read_reads(tmp_path / "bad.csv")
    text = str(err.value)
    assert "name repeats an earlier row: row 3" in text
    assert "not 0 or 1 (R1:ICH)" in text and "row 4" in text
    assert "empty name: row 5" in text
    (tmp_path / "nocol.csv").write_text("name,R1:ICH\nCQ500-CT-0,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['R1:IPH'"):
        read_reads(tmp_path / "nocol.csv")


def test_reader_kappa_closed_form(tmp_path: Path) -> None:
    """ICH: 2 scans all-yes, 2 all-no → κ 1. SDH: one scan 1 of 3 yes, three all-no: p = 1/12, P̄ = (1/3 + 3)/4,
    P_e = (1/12)² + (11/12)², κ = (P̄ − P_e)/(1 − P_e)."""
    reads = read_reads(write_reads(tmp_path / "reads.csv", [
        reads_row("a", (1, 1, 1), sdh=(1, 0, 0)), reads_row("b", (1, 1, 1)), reads_row("c", (0, 0, 0)),
        reads_row("d", (0, 0, 0))]))
    kappas = reader_kappas(reads)
    assert kappas["ICH"] == pytest.approx(1.0)
    p_bar, p_e = (1 / 3 + 3) / 4, (1 / 12) ** 2 + (11 / 12) ** 2
    assert kappas["SDH"] == pytest.approx((p_bar - p_e) / (1 - p_e))
    assert kappas["EDH"] is None  # nobody marked it: κ undefined


def test_triage_metrics_closed_form() -> None:
    """Positives 0.9, 0.4; negatives 0.6, 0.3, 0.1: 5 of 6 pairs ordered → AUC 5/6. At 0.5: TP 1 (0.9), FP 1 (0.6),
    FN 1, TN 2. Sensitivity ≥ 0.95 needs the 0.4 threshold, which also flags 0.6: specificity 2/3."""
    score = np.array([0.9, 0.4, 0.6, 0.3, 0.1])
    positive = np.array([True, True, False, False, False])
    m = triage_metrics(score, positive, threshold=0.5, n_boot=200)
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["at_threshold"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 2, "sensitivity": 0.5,
                                 "specificity": pytest.approx(2 / 3), "ppv": 0.5, "npv": pytest.approx(2 / 3),
                                 "accuracy": pytest.approx(3 / 5)}
    assert m["specificity_at_95_sensitivity"] == pytest.approx(2 / 3)
    every = m["baselines"]["flag every scan"]
    assert (every["sensitivity"], every["specificity"], every["accuracy"]) == (1.0, 0.0, pytest.approx(0.4))
    none = m["baselines"]["flag no scan"]
    assert (none["sensitivity"], none["specificity"], none["accuracy"]) == (0.0, 1.0, pytest.approx(0.6))
    low, high = m["auc_ci"]
    assert 0.0 <= low <= m["auc"] <= high <= 1.0
    one_class = triage_metrics(score, np.zeros(5, bool), n_boot=10)
    assert np.isnan(one_class["auc"]) and one_class["beats_chance"] is False


def write_scan(root: Path, ct_writer: Callable[..., str], patient_id: str, seed: int, n: int = 3) -> None:
    rng = np.random.default_rng(seed)
    study = f"1.2.826.0.1.{seed}"
    for i in range(n):
        hu = rng.integers(-100, 120, size=(32, 32)).astype(np.int16)
        ct_writer(root / f"p{seed}" / f"im{i}", hu, study=study, series=f"{study}.2", sop=f"{study}.2.{i}",
                  patient_id=patient_id, z=5.0 * i, instance=i + 1, BodyPartExamined="HEAD")


def test_triage_joins_reads_by_patient_and_scores_as_the_served_model(
    tmp_path: Path, ct_writer: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five CQ500-named scans (one in the folder spelling) and one unnamed scan are ingested; reads.csv also names
    a scan that is not there. The scan score is the served model's max(1 − p_non_ich) over the scan's DICOM files,
    the metrics are sklearn's on the written table, and no name reaches any output."""
    monkeypatch.setenv(KEY_ENV, "triage-test-key-0123456789abcdef")
    names = ["CQ500-CT-0", "CQ500-CT-1", "CQ500-CT-2", "CQ500CT3", "CQ500-CT-4"]
    for seed, name in enumerate(names):
        write_scan(tmp_path / "dicom", ct_writer, name, seed)
    write_scan(tmp_path / "dicom", ct_writer, "OTHER-7", 7)
    ingest(tmp_path / "dicom", tmp_path / "ingest", IngestConfig(), progress=False)
    votes = [(1, 1, 0), (0, 0, 0), (1, 1, 1), (0, 1, 0), (1, 0, 1)]
    reads = write_reads(tmp_path / "reads.csv", [
        *(reads_row(n if n != "CQ500CT3" else "CQ500-CT-3", v, sdh=v) for n, v in zip(names, votes, strict=True)),
        reads_row("CQ500-CT-9", (1, 1, 1))])
    make_checkpoint(tmp_path / "model.pt")
    model = BlendSignModel()
    model.load_checkpoints([tmp_path / "model.pt"], device="cpu")

    result = triage(model, tmp_path / "ingest", reads, tmp_path / "out", progress=False)
    assert result["join"] == {"reads": 6, "scored": 5, "unmatched_rows": [7], "unread_scans": 1}
    table = pq.read_table(tmp_path / "out" / "scans.parquet").to_pandas()
    assert sorted(table["ich_votes"]) == sorted(sum(v) for v in votes)
    assert list(table["gold_ich"]) == [v >= 2 for v in table["ich_votes"]]
    assert list(table["slices"]) == [3] * 5

    served = []  # the same scans through the serving path: DICOM bytes → read_slice → to_model_input
    for seed in range(len(names)):
        files = sorted((tmp_path / "dicom" / f"p{seed}").iterdir())
        out = model.predict(None, pd.DataFrame({DICOM_COLUMN: [f.read_bytes() for f in files]}))
        served.append((sum(votes[seed]), float((1.0 - out["p_non_ich"].astype(float)).max())))
    np.testing.assert_allclose(sorted(table["score"]), sorted(s for _, s in served), rtol=1e-5)

    m = json.loads((tmp_path / "out" / "triage.json").read_text())["metrics"]
    assert m["auc"] == pytest.approx(roc_auc_score(table["gold_ich"], table["score"]))
    assert m["positives"] == 3 and m["scans"] == 5
    assert (tmp_path / "out" / "triage_roc.png").stat().st_size > 5000
    assert "| flag every scan | 1.000 | 0.000 |" in (tmp_path / "out" / "triage.md").read_text()
    for path in (tmp_path / "out").iterdir():
        data = path.read_bytes()
        assert b"CQ500" not in data and b"OTHER-7" not in data, path.name


def test_cli_triage_on_a_logged_model(tmp_path: Path, ct_writer: Callable[..., str], served: dict,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(KEY_ENV, "triage-test-key-0123456789abcdef")
    for seed in range(2):
        write_scan(tmp_path / "dicom", ct_writer, f"CQ500-CT-{seed}", seed, n=2)
    ingest(tmp_path / "dicom", tmp_path / "ingest", IngestConfig(), progress=False)
    reads = write_reads(tmp_path / "reads.csv", [reads_row("CQ500-CT-0", (1, 1, 1)),
                                                 reads_row("CQ500-CT-1", (0, 0, 0))])
    rc = cli.main(["triage", str(tmp_path / "ingest"), str(tmp_path / "out"), "--reads", str(reads), "--model",
                   served["model_uri"], "--tracking-uri", served["uri"], "--device", "cpu", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "triage of 2 scans (1 with ICH)" in out and "0 reads without an ingested scan" in out
    with pytest.raises(ValueError, match=r"no read of .* joins a scan"):
        triage(None, tmp_path / "ingest", write_reads(tmp_path / "other.csv", [reads_row("CQ500-CT-5", (1, 1, 1))]),
               tmp_path / "out2", progress=False)
