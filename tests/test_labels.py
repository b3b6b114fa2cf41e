"""Label fusion (blendsign.labels): Fleiss' κ, majority vote, box fusion, ``fuse``, importers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blendsign.cli import main
from blendsign.config import LabelConfig
from blendsign.deid import KEY_ENV, Pseudonymizer
from blendsign.labels import (
    FusedBox,
    category_kappas,
    fleiss_kappa,
    fuse,
    fuse_boxes,
    import_annotations,
    iou,
    majority_vote,
    match_boxes,
    read_annotations,
    read_bhx,
    read_rsna,
    reader_label,
)
from blendsign.storage import mark_complete

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "test-key-0123456789abcdef"
HEADER = "study_instance_uid,sop_instance_uid,reader,label,x_min,y_min,x_max,y_max\n"

# --- Fleiss' κ ---------------------------------------------------------------------------------------

# Fleiss (1971), Psychol. Bull. 76(5):378–382, Table 1: 30 patients × 6 psychiatrists, categories
# depression, personality disorder, schizophrenia, neurosis, other (also R package irr, `diagnoses`).
# The paper reports κ = .430 and category κ .245, .245, .520, .471, .566.
FLEISS_1971 = np.array([
    [0, 0, 0, 6, 0], [0, 3, 0, 0, 3], [0, 1, 4, 0, 1], [0, 0, 0, 0, 6], [0, 3, 0, 3, 0],
    [2, 0, 4, 0, 0], [0, 0, 4, 0, 2], [2, 0, 3, 1, 0], [2, 0, 0, 4, 0], [0, 0, 0, 0, 6],
    [1, 0, 0, 5, 0], [1, 1, 0, 4, 0], [0, 3, 3, 0, 0], [1, 0, 0, 5, 0], [0, 2, 0, 3, 1],
    [0, 0, 5, 0, 1], [3, 0, 0, 1, 2], [5, 1, 0, 0, 0], [0, 2, 0, 4, 0], [1, 0, 2, 0, 3],
    [0, 0, 0, 0, 6], [0, 1, 0, 5, 0], [0, 2, 0, 1, 3], [2, 0, 0, 4, 0], [1, 0, 0, 4, 1],
    [0, 5, 0, 1, 0], [4, 0, 0, 0, 2], [0, 2, 0, 4, 0], [1, 0, 5, 0, 0], [0, 0, 0, 0, 6],
])

# Wikipedia, "Fleiss' kappa", worked example: 10 subjects × 14 raters × 5 categories, κ = 0.210.
WIKIPEDIA = np.array([
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
])


def test_fleiss_1971_table_1() -> None:
    assert fleiss_kappa(FLEISS_1971) == pytest.approx(0.430, abs=5e-4)
    assert category_kappas(FLEISS_1971) == pytest.approx([0.245, 0.245, 0.520, 0.471, 0.566], abs=5e-4)


def test_fleiss_wikipedia_example() -> None:
    assert fleiss_kappa(WIKIPEDIA) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_hand_computed() -> None:
    # 2 raters, 3 subjects: agree, agree, split. p = (.5, .5) → P_e = .5; P̄ = (1 + 1 + 0)/3 = 2/3;
    # κ = (2/3 − 1/2)/(1/2) = 1/3. Category κ_j = 1 − 1/(3·2·1·.25) = 1/3 for both.
    counts = np.array([[2, 0], [0, 2], [1, 1]])
    assert fleiss_kappa(counts) == pytest.approx(1 / 3)
    assert category_kappas(counts) == pytest.approx([1 / 3, 1 / 3])


# --- majority vote -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("votes", "expected"), [
    ([3, 0, 0], ("non_ich", False)),
    ([1, 2, 0], ("normal_ich", False)),
    ([0, 1, 2], ("blend_sign", False)),
    ([2, 0, 1], ("non_ich", False)),
    ([1, 1, 1], ("normal_ich", True)),  # paper: three-way split → normal ICH
    ([0, 0, 1], ("blend_sign", False)),
    ([2, 0, 2], ("blend_sign", True)),  # tie precedence normal_ich > blend_sign > non_ich
    ([2, 2, 0], ("normal_ich", True)),
    ([0, 2, 2], ("normal_ich", True)),
    ([1, 3, 1], ("normal_ich", False)),
])
def test_majority_vote(votes: list[int], expected: tuple[str, bool]) -> None:
    assert majority_vote(votes) == expected


@pytest.mark.parametrize("votes", [[0, 0, 0], [1, 1], [1, -1, 2]])
def test_majority_vote_rejects_bad_votes(votes: list[int]) -> None:
    with pytest.raises(ValueError, match="votes"):
        majority_vote(votes)


def test_reader_label_both_ich_classes_is_blend_sign() -> None:
    assert reader_label(["normal_ich", "blend_sign", "normal_ich"]) == "blend_sign"
    assert reader_label(["normal_ich"]) == "normal_ich"
    assert reader_label(["non_ich", "non_ich"]) == "non_ich"
    assert reader_label(["non_ich", "normal_ich"]) is None
    assert reader_label(["blend_sign", "non_ich"]) is None


# --- boxes -------------------------------------------------------------------------------------------


def test_iou_hand_computed() -> None:
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0


def test_fuse_boxes_mean_of_majority_region() -> None:
    boxes = [
        [(10, 10, 30, 30), (100, 100, 110, 110)],  # reader 0
        [(12, 10, 32, 30)],  # reader 1
        [(10, 12, 30, 32), (200, 200, 210, 210)],  # reader 2
    ]
    assert match_boxes(boxes, 0.5) == [[(0, 0), (1, 0), (2, 0)], [(0, 1)], [(2, 1)]]
    (fused,) = fuse_boxes(boxes, n_readers=3, min_iou=0.5)  # the lone boxes lack a majority
    assert (fused.x_min, fused.y_min, fused.x_max, fused.y_max) == pytest.approx((32 / 3, 32 / 3, 92 / 3, 92 / 3))
    d = fused.as_dict()
    assert (d["cx"], d["cy"], d["left"], d["right"], d["top"], d["bottom"]) == pytest.approx(
        (62 / 3, 62 / 3, 10, 10, 10, 10))
    assert d["readers"] == 3


def test_two_of_three_readers_is_a_majority() -> None:
    boxes = [[(0, 0, 10, 10)], [(0, 0, 10, 12)], [(50, 50, 60, 60)]]
    assert fuse_boxes(boxes, 3, 0.5) == [FusedBox(0, 0, 10, 11, readers=2)]
    assert fuse_boxes(boxes, 4, 0.5) == []  # 2 of 4 is no majority
    assert fuse_boxes([[(5, 5, 9, 9)]], 1, 0.5) == [FusedBox(5, 5, 9, 9, readers=1)]


def test_match_boxes_is_complete_linkage_one_box_per_reader() -> None:
    a, b, c = (0, 0, 10, 10), (2, 0, 12, 10), (5, 0, 15, 10)  # IoU a-b .667, b-c .538, a-c .333
    assert match_boxes([[a], [b], [c]], 0.5) == [[(0, 0), (1, 0)], [(2, 0)]]
    assert match_boxes([[a, a]], 0.5) == [[(0, 0)], [(0, 1)]]  # one reader's boxes never merge
    assert match_boxes([[a], [c]], 0.3) == [[(0, 0), (1, 0)]]


# --- fuse --------------------------------------------------------------------------------------------


def write_ingest(folder: Path, slices: list[tuple[str, str, int, str]], *, rows: int = 64, cols: int = 64,
                 key: str = KEY) -> Path:
    """A minimal ingest output: ``slices/part-0.parquet`` in the ingest schema + ``ingest_report.json``.

    ``slices``: ``(study uid, patient id, slice index, SOP instance uid)``; keys are pseudonymized.
    """
    pz = Pseudonymizer(key.encode())
    n = len(slices)
    table = pa.table({
        "scan_id": pa.array([pz.scan(s[0]) for s in slices], pa.string()),
        "patient_key": pa.array([pz.patient(s[1]) for s in slices], pa.string()),
        "slice_index": pa.array([s[2] for s in slices], pa.int32()),
        "z_mm": pa.array([5.0 * s[2] for s in slices], pa.float64()),
        "rows": pa.array([rows] * n, pa.int32()),
        "cols": pa.array([cols] * n, pa.int32()),
        "pixel_spacing_mm": pa.array([[0.5, 0.5]] * n, pa.list_(pa.float64())),
        "slice_thickness_mm": pa.array([5.0] * n, pa.float64()),
        "instance_key": pa.array([pz.instance(s[3]) for s in slices], pa.string()),
        "hu": pa.array([b"\x00\x00"] * n, pa.binary()),
    })
    (folder / "slices").mkdir(parents=True)
    pq.write_table(table, folder / "slices" / "part-0.parquet")
    (folder / "ingest_report.json").write_text(json.dumps({"key_fingerprint": pz.fingerprint}))
    mark_complete(folder)
    return folder


@pytest.fixture
def ingest_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(KEY_ENV, KEY)
    slices = [("1.2.9.1", "PAT-A", i, f"1.2.9.1.{i}") for i in range(4)]
    slices += [("1.2.9.2", "PAT-B", i, f"1.2.9.2.{i}") for i in range(2)]
    return write_ingest(tmp_path / "ingest", slices)


ANNOTATIONS = HEADER + """\
1.2.9.1,1.2.9.1.0,A,non_ich,,,,
1.2.9.1,1.2.9.1.0,B,non_ich,,,,
1.2.9.1,1.2.9.1.0,C,non_ich,,,,
1.2.9.1,1.2.9.1.1,A,normal_ich,10,10,30,30
1.2.9.1,1.2.9.1.1,B,blend_sign,12,10,32,30
1.2.9.1,1.2.9.1.1,C,normal_ich,10,12,30,32
1.2.9.1,1.2.9.1.1,C,blend_sign,40,40,50,50
1.2.9.1,1.2.9.1.2,A,non_ich,,,,
1.2.9.1,1.2.9.1.2,B,normal_ich,0,0,8,8
1.2.9.1,1.2.9.1.2,C,blend_sign,0,0,8,8
1.2.9.2,1.2.9.2.0,A,non_ich,,,,
1.2.9.2,1.2.9.2.0,B,non_ich,,,,
1.2.9.2,1.2.9.2.0,C,normal_ich,5,5,9,9
1.2.9.2,1.2.9.2.1,A,normal_ich,,,,
1.2.9.2,1.2.9.2.1,B,normal_ich,,,,
9.9.9,9.9.9.1,A,non_ich,,,,
9.9.9,9.9.9.1,B,non_ich,,,,
"""


def _write(tmp_path: Path, text: str, name: str = "annotations.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_fuse_gold_labels_boxes_and_report(tmp_path: Path, ingest_dir: Path) -> None:
    out = tmp_path / "labels"
    typo = "1.2.9.2,1.2.9.2.7,A,non_ich,,,,\n"  # line 19: a slice of an ingested study that matches no file
    result = fuse(_write(tmp_path, ANNOTATIONS + typo), ingest_dir, out, LabelConfig())
    pz = Pseudonymizer(KEY.encode())
    rows = {r["instance_key"]: r for r in pq.read_table(out / "labels.parquet").to_pylist()}
    assert len(rows) == 5 and result.slices == 5
    s0, s1, s2 = (rows[pz.instance(f"1.2.9.1.{i}")] for i in range(3))
    t0, t1 = (rows[pz.instance(f"1.2.9.2.{i}")] for i in range(2))
    assert (s0["label"], s0["votes"], s0["contested"], s0["boxes"]) == ("non_ich", [3, 0, 0], False, [])
    # reader C's normal_ich + blend_sign rows count as blend_sign → votes [0, 1, 2]
    assert (s1["label"], s1["votes"], s1["contested"], s1["n_readers"]) == ("blend_sign", [0, 1, 2], False, 3)
    (box,) = s1["boxes"]  # C's second box (40..50) has no majority
    assert box["x_min"] == pytest.approx(32 / 3) and box["y_max"] == pytest.approx(92 / 3)
    assert box["cx"] == pytest.approx(62 / 3) and box["left"] == pytest.approx(10) and box["readers"] == 3
    assert (s2["label"], s2["votes"], s2["contested"]) == ("normal_ich", [1, 1, 1], True)
    assert s2["boxes"][0]["readers"] == 2  # B and C: 2 of 3 readers
    assert (t0["label"], t0["boxes"]) == ("non_ich", [])  # non_ich gold: C's box is dropped
    assert (t1["label"], t1["n_readers"]) == ("normal_ich", 2)
    assert s0["scan_id"] == pz.scan("1.2.9.1") and s0["patient_key"] == pz.patient("PAT-A")

    report = json.loads((out / "agreement.json").read_text())
    assert report["gold_counts"] == {"non_ich": 2, "normal_ich": 2, "blend_sign": 1}
    assert report["contested"] == 1 and report["readers"] == 3 and report["kappa_slices"] == 4
    assert report["unmatched_annotations"] == {"rows": 3, "slices": 2, "rows_in_ingested_studies": 1,
                                               "csv_lines": [19]}
    assert report["unannotated_ingested_slices"] == 1
    votes = np.array([[3, 0, 0], [0, 1, 2], [1, 1, 1], [2, 1, 0]])  # slices rated by all three readers
    assert report["fleiss_kappa"]["overall"] == pytest.approx(fleiss_kappa(votes))
    assert [report["fleiss_kappa"][c] for c in ("non_ich", "normal_ich", "blend_sign")] == pytest.approx(
        category_kappas(votes).tolist())
    md = (out / "agreement.md").read_text()
    assert "| blend_sign | 1 |" in md and "8,864" in md and "447" in md and "CSV lines 19" in md
    assert result.unmatched_rows == 3 and result.fused_boxes == 2 and "5 slices" in result.summary()


def test_fuse_writes_no_uids_and_is_reproducible(tmp_path: Path, ingest_dir: Path) -> None:
    csv = _write(tmp_path, ANNOTATIONS)
    fuse(csv, ingest_dir, tmp_path / "a")
    fuse(csv, ingest_dir, tmp_path / "b")
    for name in ("labels.parquet", "agreement.json", "agreement.md"):
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes()
        for uid in ("1.2.9.1", "9.9.9", "PAT-A"):
            assert uid.encode() not in data
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["agreement.json", "agreement.md", "labels.parquet"]


def test_fuse_single_reader_kappa_undefined(tmp_path: Path, ingest_dir: Path) -> None:
    text = HEADER + "1.2.9.1,1.2.9.1.0,bhx,normal_ich,1,1,5,5\n"
    result = fuse(_write(tmp_path, text), ingest_dir, tmp_path / "out")
    assert result.kappa["overall"] is None and result.fused_boxes == 1
    assert json.loads((tmp_path / "out" / "agreement.json").read_text())["fleiss_kappa"]["overall"] is None


@pytest.mark.parametrize(("line", "message"), [
    ("1.2.9.1,1.2.9.1.0,A,ich,,,,", "unknown label"),
    ("1.2.9.1,1.2.9.1.0,A,normal_ich,30,10,30,20", "empty or inverted box"),
    ("1.2.9.1,1.2.9.1.0,A,normal_ich,10,20,30,19", "empty or inverted box"),
    ("1.2.9.1,1.2.9.1.0,A,normal_ich,10,10,65,20", "outside the image"),
    ("1.2.9.1,1.2.9.1.0,A,normal_ich,-1,10,20,20", "outside the image"),
    ("1.2.9.1,1.2.9.1.0,A,normal_ich,10,10,,20", "partially filled box"),
    ("1.2.9.1,1.2.9.1.0,A,normal_ich,10,ten,20,20", "not a finite number"),
    ("1.2.9.1,1.2.9.1.0,A,non_ich,10,10,20,20", "box on a non_ich row"),
    ("1.2.9.1,1.2.9.1.0,A,non_ich", "wrong number of fields"),
    ("1.2.9.1,,A,non_ich,,,,", "empty sop_instance_uid"),
    ("1.2.9.2,1.2.9.1.1,A,non_ich,,,,", "not the study of this slice"),
])
def test_fuse_bad_row_names_the_row(tmp_path: Path, ingest_dir: Path, line: str, message: str) -> None:
    text = HEADER + "1.2.9.1,1.2.9.1.0,B,normal_ich,,,,\n" + line + "\n"
    with pytest.raises(ValueError, match=rf"{message}.*: row 3\b"):
        fuse(_write(tmp_path, text), ingest_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fuse_self_contradiction_names_both_rows(tmp_path: Path, ingest_dir: Path) -> None:
    text = HEADER + "1.2.9.1,1.2.9.1.0,A,non_ich,,,,\n1.2.9.1,1.2.9.1.1,A,non_ich,,,,\n" \
                    "1.2.9.1,1.2.9.1.0,A,blend_sign,1,1,5,5\n"
    with pytest.raises(ValueError, match=r"both non_ich and ICH: rows 2, 4"):
        fuse(_write(tmp_path, text), ingest_dir, tmp_path / "out")


def test_fuse_study_uid_conflict_and_missing_column(tmp_path: Path, ingest_dir: Path) -> None:
    text = HEADER + "1.2.9.1,1.2.9.1.0,A,non_ich,,,,\n1.2.9.7,1.2.9.1.0,B,non_ich,,,,\n"
    with pytest.raises(ValueError, match=r"two study_instance_uids: rows 2, 3"):
        read_annotations(_write(tmp_path, text))
    text = "study_instance_uid,sop_instance_uid,reader,x_min,y_min,x_max,y_max\n1,2,A,,,,\n"
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\]"):
        fuse(_write(tmp_path, text), ingest_dir, tmp_path / "out")


def test_fuse_error_leaves_previous_outputs(tmp_path: Path, ingest_dir: Path) -> None:
    out = tmp_path / "out"
    fuse(_write(tmp_path, ANNOTATIONS), ingest_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError):
        fuse(_write(tmp_path, ANNOTATIONS + "1.2.9.1,1.2.9.1.3,A,maybe,,,,\n"), ingest_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_fuse_wrong_key_is_refused(tmp_path: Path, ingest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "another-key-0123456789abcdef")
    with pytest.raises(ValueError, match="not the key the ingest used"):
        fuse(_write(tmp_path, ANNOTATIONS), ingest_dir, tmp_path / "out")


def test_fuse_nothing_joins(tmp_path: Path, ingest_dir: Path) -> None:
    with pytest.raises(ValueError, match="no annotation matches"):
        fuse(_write(tmp_path, HEADER + "9.9,9.9.1,A,non_ich,,,,\n"), ingest_dir, tmp_path / "out")


def test_fuse_on_an_ingest_that_wrote_nothing(tmp_path: Path, ingest_dir: Path) -> None:
    for f in (ingest_dir / "slices").glob("*.parquet"):  # every scan excluded or quarantined
        f.unlink()
    with pytest.raises(ValueError, match="holds no ingested slice"):
        fuse(_write(tmp_path, ANNOTATIONS), ingest_dir, tmp_path / "out")


def test_cli_fuse(tmp_path: Path, ingest_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _write(tmp_path, ANNOTATIONS)
    assert main(["fuse", str(csv), str(ingest_dir), str(tmp_path / "out"), "--box-match-iou", "0.6"]) == 0
    assert "fused 5 slices" in capsys.readouterr().out
    bad = _write(tmp_path, HEADER + "1.2.9.1,1.2.9.1.0,A,ich,,,,\n", "bad.csv")
    assert main(["fuse", str(bad), str(ingest_dir), str(tmp_path / "out2")]) == 2


# --- importers ---------------------------------------------------------------------------------------


def test_import_rsna(tmp_path: Path) -> None:
    out = tmp_path / "rsna.csv"
    result = import_annotations("rsna", FIXTURES / "rsna_stage_2_train.csv", out)
    assert (result.rows_read, result.rows_written, result.images, result.boxes) == (19, 3, 3, 0)
    assert result.label_counts == {"non_ich": 1, "normal_ich": 2}
    assert out.read_text().splitlines() == [
        HEADER.strip(),
        ",ID_63eb1e259,rsna,normal_ich,,,,",
        ",ID_2669954a7,rsna,non_ich,,,,",
        ",ID_52c9913b1,rsna,normal_ich,,,,",
    ]
    assert len(read_annotations(out)) == 3


def test_import_bhx(tmp_path: Path) -> None:
    out = tmp_path / "bhx.csv"
    result = import_annotations("bhx", FIXTURES / "bhx_bounding_boxes.csv", out)
    assert (result.rows_read, result.rows_written, result.images, result.boxes) == (3, 3, 2, 3)
    assert out.read_text().splitlines()[1:] == [
        "ID_6e4f1ba16a,ID_52c9913b1,bhx,normal_ich,239,107.5,270,144.5",
        "ID_6e4f1ba16a,ID_52c9913b1,bhx,normal_ich,250.25,300,270.25,312.5",
        "ID_9a1c2d3e4f,ID_63eb1e259,bhx,normal_ich,60,80,75,170",
    ]
    assert read_annotations(out)[0].box == (239.0, 107.5, 270.0, 144.5)


@pytest.mark.parametrize(("replace", "by", "message", "row"), [
    ("ID_2669954a7_subdural,0", "ID_2669954a7_subdural,2", "Label is not 0 or 1", 12),
    ("ID_2669954a7_subdural,0", "ID_2669954a7-subdural,0", "ID is not ID_<image>_<subtype>", 12),
    ("ID_2669954a7_subdural,0", "ID_2669954a7_sub,0", "ID is not ID_<image>_<subtype>", 12),
    ("ID_2669954a7_subdural,0\n", "", "without all 6 subtype rows", 8),
    ("ID_2669954a7_any,0", "ID_2669954a7_any,1", "'any' disagrees", 8),
    ("ID_52c9913b1_any,1\nID_52c9913b1_any,1", "ID_52c9913b1_any,1\nID_52c9913b1_any,0", "conflicting", 20),
])
def test_rsna_malformed(tmp_path: Path, replace: str, by: str, message: str, row: int) -> None:
    text = (FIXTURES / "rsna_stage_2_train.csv").read_text()
    assert replace in text
    with pytest.raises(ValueError, match=rf"{message}.*: row {row}\b"):
        read_rsna(_write(tmp_path, text.replace(replace, by), "rsna.csv"))


@pytest.mark.parametrize(("data", "message"), [
    ("\"{'x': 1, 'y': 2, 'width': 0, 'height': 3}\"", "width or height"),
    ("\"{'x': 1, 'y': 2, 'width': 5}\"", "not a dict"),
    ("\"__import__('os').getcwd()\"", "not a dict"),
    ("\"{'x': 'a', 'y': 2, 'width': 5, 'height': 3}\"", "not a dict"),
])
def test_bhx_malformed(tmp_path: Path, data: str, message: str) -> None:
    lines = (FIXTURES / "bhx_bounding_boxes.csv").read_text().splitlines()
    lines.insert(2, f"ID_x,ID_y,ID_z,{data},Subdural,Local")
    with pytest.raises(ValueError, match=rf"{message}.*: row 3\b"):
        read_bhx(_write(tmp_path, "\n".join(lines) + "\n", "bhx.csv"))


def test_import_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown annotation format"):
        import_annotations("nifti", FIXTURES / "bhx_bounding_boxes.csv", tmp_path / "x.csv")
    with pytest.raises(ValueError, match="missing column"):
        import_annotations("bhx", FIXTURES / "rsna_stage_2_train.csv", tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()
    src = FIXTURES / "bhx_bounding_boxes.csv"
    assert main(["import-annotations", "--format", "bhx", str(src), str(tmp_path / "b.csv")]) == 0
    assert "3 boxes" in capsys.readouterr().out


def test_imported_bhx_fuses_with_one_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    ingest = write_ingest(tmp_path / "ingest", [("ID_6e4f1ba16a", "P", 0, "ID_52c9913b1")], rows=512, cols=512)
    csv = tmp_path / "bhx.csv"
    import_annotations("bhx", FIXTURES / "bhx_bounding_boxes.csv", csv)
    result = fuse(csv, ingest, tmp_path / "out")
    assert (result.slices, result.fused_boxes, result.unmatched_rows, result.readers) == (1, 2, 1, 1)
    assert math.isclose(result.gold_counts["normal_ich"], 1)
