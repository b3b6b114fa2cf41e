"""The evaluation report as one self-contained HTML file (``report.html`` beside ``report.md``).

Kubeflow's HTML viewer renders a file in a sandboxed iframe (``srcdoc``), so :func:`html_report` inlines every
figure as a ``data:`` URI and uses no script and no external resource; MLflow shows the same file.
"""

from __future__ import annotations

import base64
import mimetypes
import re
from html import escape, unescape
from pathlib import Path

import markdown as markdown_lib

from blendsign.storage import write_text_atomic

HTML_REPORT_FILE = "report.html"
"""The self-contained HTML report beside ``report.md`` in an ``evaluate`` output."""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; background: #fff;
       max-width: 1150px; margin: 1.5em auto; padding: 0 1em; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
.missing { display: inline-block; border: 1px dashed #a66; background: #fff4f0; color: #733; padding: 0.4em 0.8em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""
_IMG = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
_SRC = re.compile(r"""\bsrc\s*=\s*(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)


def _inline_image(tag: str, folder: Path) -> str:
    """``tag`` with its ``src`` as a ``data:`` URI; a note in its place if the file is not in ``folder``."""
    match = _SRC.search(tag)
    if match is None:
        return tag
    src = unescape(match.group(1) if match.group(1) is not None else match.group(2))
    if src.startswith("data:"):
        return tag
    root = folder.resolve()
    path = (root / src).resolve()
    mime = mimetypes.guess_type(path.name)[0] or ""
    if "://" in src or src.startswith("//") or not path.is_relative_to(root):
        reason = "not embedded (not a file of the report's folder)"
    elif not path.is_file():
        reason = "missing"
    elif not mime.startswith("image/"):
        reason = "not embedded (not an image file)"
    else:
        uri = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
        return tag[: match.start()] + f'src="{uri}"' + tag[match.end():]
    return f'<span class="missing">figure <code>{escape(src)}</code> {reason}</span>'


def html_report(markdown_text: str, folder: Path, title: str) -> str:
    """``markdown_text`` as one HTML document: tables rendered, the images of ``folder`` inlined as ``data:`` URIs,
    inline CSS, no script and no external resource. An image that is not a file of ``folder`` becomes a visible
    note, never a broken link."""
    body = markdown_lib.markdown(markdown_text, extensions=["tables"], output_format="html")
    body = _IMG.sub(lambda m: _inline_image(m.group(0), Path(folder)), body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_html_report(markdown_path: Path, html_path: Path, title: str) -> Path:
    """Render ``markdown_path`` (its images from its own folder) to ``html_path``, replaced in one step."""
    markdown_path = Path(markdown_path)
    write_text_atomic(html_path, html_report(markdown_path.read_text(encoding="utf-8"), markdown_path.parent, title))
    return Path(html_path)
