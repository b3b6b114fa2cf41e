"""blendsign.evaluate: ``metrics.json`` read back (strict JSON, NaN as null), the Grad-CAM figure's picks (the
whole evaluation, trained models included, is tested with cross-validation in test_cv.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from blendsign.evaluate import EvalResult, figure_picks
from tests.conftest import evaluation_folder


def test_figure_picks_cover_every_class_correct_and_wrong_first() -> None:
    """Correct non-ICH examples are the most confident, yet the first six are one correct and one wrong per class."""
    cams = [{"class": 0, "correct": True, "p": 0.99 - i / 100, "id": f"n{i}"} for i in range(6)]
    cams += [{"class": 0, "correct": False, "p": 0.6, "id": "nx"}, {"class": 1, "correct": True, "p": 0.7, "id": "i"},
             {"class": 1, "correct": False, "p": 0.8, "id": "ix"}, {"class": 2, "correct": True, "p": 0.5, "id": "b"},
             {"class": 2, "correct": False, "p": 0.4, "id": "bx"}, {"class": 2, "correct": True, "p": 0.9, "id": "b2"}]
    assert [c["id"] for c in figure_picks(cams, 6)] == ["n0", "nx", "i", "ix", "b2", "bx"]
    assert [c["id"] for c in figure_picks(cams, 8)][6:] == ["n1", "b"]  # then the next of each kind, in order
    assert figure_picks([], 6) == []


def test_evaluation_from_its_folder(tmp_path: Path) -> None:
    ev = EvalResult.load(evaluation_folder(tmp_path / "evaluation"))
    text = (tmp_path / "evaluation" / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["cv"]["auc_non_ich"] == [None, None]  # strict JSON: null
    assert all(math.isnan(v) for v in ev.cv["auc_non_ich"])  # read back as NaN
    assert sorted(ev.per_fold) == [0, 1] and "0.800 ± 0.100 [0.700, 0.900]" in ev.summary()
    assert ev.cv_means()["cv_auc_blend_sign"] == 0.8 and "cv_auc_non_ich" not in ev.cv_means()  # NaN left out
