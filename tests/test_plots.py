"""Evaluation figures (blendsign.plots): every function writes a valid PNG atomically and survives edge cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from blendsign import plots
from blendsign.metrics import calibration

PNG = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path, *, min_px: int = 200, max_px: int = 4000) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_px <= width <= max_px and min_px <= height <= max_px, (width, height)
    assert [p.name for p in path.parent.iterdir() if p.name != path.name and p.suffix == ".tmp"] == []
    return width, height


def _cohort(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += 2.0
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), labels


@pytest.fixture
def texts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text drawn in the figures saved during the test (titles, legends, annotations, tick labels)."""
    seen: list[str] = []
    save = plots._save

    def spy(fig: Any, path: Any, **kwargs: Any) -> Path:
        seen.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def test_agg_backend_and_figures_closed(tmp_path: Path) -> None:
    assert matplotlib.get_backend().lower() == "agg"
    probs, labels = _cohort()
    plots.roc_curves(probs, labels, tmp_path / "roc.png")
    plots.confusion_matrix(labels, probs.argmax(1), tmp_path / "cm.png")
    assert plots.plt.get_fignums() == []


def test_roc_curves(tmp_path: Path, texts: list[str]) -> None:
    probs, labels = _cohort()
    folds = [(probs[i::5], labels[i::5]) for i in range(5)]
    out = plots.roc_curves(probs, labels, tmp_path / "sub" / "roc.png", title="Pooled ROC", folds=folds)
    assert out == tmp_path / "sub" / "roc.png"
    _check_png(out)
    assert "Pooled ROC" in texts
    assert any(t.startswith("blend sign (AUC 0.") and "folds" in t for t in texts)


def test_roc_with_an_absent_class_says_na(tmp_path: Path, texts: list[str]) -> None:
    probs, labels = _cohort()
    keep = labels < 2
    _check_png(plots.roc_curves(probs[keep], labels[keep], tmp_path / "roc.png", title="no blend sign"))
    assert "blend sign (AUC n/a)" in texts
    assert any(t.startswith("non-ICH (AUC 0.") for t in texts)
    # A fold without the class is skipped, not an error.
    plots.roc_curves(probs, labels, tmp_path / "roc2.png", folds=[(probs[keep], labels[keep]), (probs, labels)])


def test_confusion_matrix_columns_are_true_classes(tmp_path: Path, texts: list[str]) -> None:
    # true:  0 0 0 0 1 1 2 2 ; pred: 0 0 0 1 1 2 0 2
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 2, 0, 2])
    _check_png(plots.confusion_matrix(labels, pred, tmp_path / "cm.png", title="WCE"))
    cells = [t for t in texts if "%" in t]
    # Row = predicted, column = true, read row by row; each column sums to 100%.
    assert cells == [
        "75%\n(3)",
        "0%\n(0)",
        "50%\n(1)",
        "25%\n(1)",
        "50%\n(1)",
        "0%\n(0)",
        "0%\n(0)",
        "50%\n(1)",
        "50%\n(1)",
    ]
    assert {"True label", "Predicted label", "WCE", "blend sign"} <= set(texts)


def test_confusion_grid_and_absent_class(tmp_path: Path, texts: list[str]) -> None:
    probs, labels = _cohort()
    pred = probs.argmax(1)
    keep = labels < 2
    panels = [("WCE", labels, pred), ("WCE+AT", labels, pred), ("WCE+AT+SKD", labels[keep], pred[keep])]
    width, height = _check_png(plots.confusion_grid(panels, tmp_path / "grid.png", title="Figure 6"))
    assert width > 2 * height
    assert {"(A) WCE", "(B) WCE+AT", "(C) WCE+AT+SKD"} <= set(texts)
    assert texts.count("n/a") == 3  # the blend-sign column of panel C
    with pytest.raises(ValueError):
        plots.confusion_grid([], tmp_path / "empty.png")


def test_reliability_diagram(tmp_path: Path, texts: list[str]) -> None:
    probs, labels = _cohort()
    cal = calibration(probs, labels)
    _check_png(plots.reliability_diagram(cal, tmp_path / "rel.png", title="Calibration"))
    assert any(t.startswith("blend sign (ECE 0.") for t in texts)
    empty = calibration(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))  # no slice at all: ECE n/a
    _check_png(plots.reliability_diagram(empty, tmp_path / "rel_empty.png"))
    assert "non-ICH (ECE n/a)" in texts


def test_gradcam_grid(tmp_path: Path, texts: list[str]) -> None:
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    cam = torch.exp(-((yy - 20.0) ** 2 + (xx - 40.0) ** 2) / 100.0)
    items = [
        {"image": torch.rand(3, 64, 64), "cam": cam, "boxes": torch.zeros(0, 5), "true": "non_ich",
         "pred": "non_ich", "p": 0.97},
        {"image": np.random.rand(3, 64, 64), "cam": cam.numpy(), "boxes": np.array([[30.0, 10.0, 50.0, 30.0]]),
         "true": "normal_ich", "pred": "normal_ich", "p": 0.81},
        {"image": torch.rand(3, 64, 64), "cam": torch.zeros(64, 64), "boxes": torch.tensor([[30, 10, 50, 30, 0.6]]),
         "gold": torch.tensor([[28.0, 12.0, 48.0, 32.0]]), "true": "blend_sign", "pred": "normal_ich", "p": 0.55},
    ]  # fmt: skip
    _check_png(plots.gradcam_grid(items, tmp_path / "cam.png", title="Figure 7"))
    assert "(C) true blend sign: wrong\npred normal ICH (p=0.55)" in texts
    assert "(A) true non-ICH: correct\npred non-ICH (p=0.97)" in texts
    assert "Grad-CAM (normalised)" in texts and "readers' box" in texts  # colour bar and legend
    assert "(F) Grad-CAM: normal ICH" in texts
    assert "0.60" in texts  # the box's score
    with pytest.raises(ValueError):
        plots.gradcam_grid([], tmp_path / "empty.png")


def test_ablation_bars(tmp_path: Path, texts: list[str]) -> None:
    table = {
        setting: {
            f"{metric}_{name}": (0.5 + 0.1 * s, 0.05)
            for metric in ("sensitivity", "specificity", "f1", "auc")
            for name in ("non_ich", "normal_ich", "blend_sign")
        }
        for s, setting in enumerate(["WCE", "WCE+AT", "WCE+AT+SKD"])
    }
    table["WCE"]["auc_blend_sign"] = (float("nan"), float("nan"))  # undefined: left out
    del table["WCE+AT"]["f1_non_ich"]  # missing: left out
    _check_png(plots.ablation_bars(table, tmp_path / "ablation.png", title="Ablation"))
    assert {"WCE", "WCE+AT", "WCE+AT+SKD", "Sensitivity", "AUC", "blend sign"} <= set(texts)


def test_overwrites_atomically(tmp_path: Path) -> None:
    probs, labels = _cohort()
    path = tmp_path / "cm.png"
    path.write_bytes(b"old")
    plots.confusion_matrix(labels, probs.argmax(1), path)
    _check_png(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png"]
    assert path.stat().st_mode & 0o777 == 0o644
