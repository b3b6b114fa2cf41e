"""blendsign.html_report: the evaluation report as one self-contained HTML file, checked in a real browser."""

from __future__ import annotations

import base64
import html
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blendsign.html_report import HTML_REPORT_FILE, html_report, write_html_report
from tests.test_report import REPORT_MD, _png

WIDTH, FRAME_HEIGHT = 1200, 1300


def test_html_report_inlines_images_and_notes_missing_ones(tmp_path: Path) -> None:
    roc = _png(tmp_path / "roc.png", (255, 0, 0))
    text = REPORT_MD + "![gradcam](gradcam.png)\n"  # confusion.png and gradcam.png do not exist
    doc = html_report(text, tmp_path, "Cross-validated evaluation")
    assert "<table>" in doc and '<td style="text-align: right;">0.750</td>' in doc
    uris = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', doc)
    assert [base64.b64decode(u) for u in uris] == [roc]
    assert 'src="roc.png"' not in doc
    for name in ("confusion.png", "gradcam.png"):
        assert f'<span class="missing">figure <code>{name}</code> missing</span>' in doc
    assert doc.count("<img") == 1
    assert "<script" not in doc.lower() and "http" not in doc.lower() and "url(" not in doc
    assert "<title>Cross-validated evaluation</title>" in doc


def test_html_report_embeds_nothing_from_outside_its_folder(tmp_path: Path) -> None:
    (tmp_path / "report").mkdir()
    _png(tmp_path / "secret.png", (0, 0, 255))
    doc = html_report("![a](https://example.org/a.png)\n\n![b](../secret.png)\n\n![c](/etc/hostname)\n",
                      tmp_path / "report", "<T>")
    assert "<img" not in doc and doc.count('class="missing"') == 3
    assert re.findall(r'(?:src|href)\s*=', doc) == [] and "<title>&lt;T&gt;</title>" in doc


def test_write_html_report(tmp_path: Path) -> None:
    _png(tmp_path / "roc.png", (255, 0, 0))
    (tmp_path / "report.md").write_text(REPORT_MD)
    out = write_html_report(tmp_path / "report.md", tmp_path / HTML_REPORT_FILE, "T")
    assert out == tmp_path / HTML_REPORT_FILE
    assert out.read_text() == html_report(REPORT_MD, tmp_path, "T")
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def _figures(folder: Path) -> None:
    """A thick pure-red line plot and a pure-blue bar chart, 400×300 pixels each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot([0, 1, 2, 3], [0, 2, 1, 3], color="#ff0000", linewidth=8)
    fig.savefig(folder / "line.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.bar(["a", "b", "c"], [3, 2, 4], color="#0000ff")
    fig.savefig(folder / "bars.png")
    plt.close(fig)


def _strong(pixels: np.ndarray, channel: int) -> int:
    """Pixels whose ``channel`` is above 200 and the other two below 60."""
    others = [c for c in range(3) if c != channel]
    return int(((pixels[..., channel] > 200) & (pixels[..., others] < 60).all(axis=-1)).sum())


def test_html_report_renders_its_figures_in_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (`make browser` installs Debian's): cannot screenshot the HTML report")
    evaluation, viewer = tmp_path / "evaluation", tmp_path / "viewer"
    evaluation.mkdir()
    viewer.mkdir()
    _figures(evaluation)
    text = "# Report\n\n| class | auc |\n|---|---:|\n| non_ich | 0.750 |\n\n![line](line.png)\n\n![bars](bars.png)\n"
    doc = html_report(text, evaluation, "Report")
    stripped = re.sub(r'src="data:[^"]*"', 'src=""', doc)
    assert stripped != doc
    # as Kubeflow's HTML viewer shows it: a sandboxed srcdoc iframe, in a page far from the figures' folder
    frame = (f'<iframe sandbox="" style="display:block;border:0;width:{WIDTH}px;height:{FRAME_HEIGHT}px" '
             'srcdoc="{}"></iframe>')
    page = viewer / "page.html"
    page.write_text('<!DOCTYPE html><html><body style="margin:0;background:#fff">'
                    + frame.format(html.escape(doc, quote=True)) + frame.format(html.escape(stripped, quote=True))
                    + "</body></html>")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WIDTH},{2 * FRAME_HEIGHT}",
                    "--force-device-scale-factor=1", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=60)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    assert pixels.shape[:2] == (2 * FRAME_HEIGHT, WIDTH)
    inlined, without = pixels[:FRAME_HEIGHT], pixels[FRAME_HEIGHT:]
    assert _strong(inlined, 0) > 1500, "the red line plot did not render"
    assert _strong(inlined, 2) > 15000, "the blue bar chart did not render"
    assert _strong(without, 0) < 50 and _strong(without, 2) < 50, "figures rendered without their data URIs"
