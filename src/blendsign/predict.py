"""The registered model on files and folders (``blendsign predict``): per-slice rows and per-scan summaries."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom

from blendsign.model_package import load
from blendsign.serving import DICOM_COLUMN, OUTPUT_COLUMNS

__all__ = ["predict_paths"]


def _files(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Every file under ``paths`` (folders recursively, sorted), with its name relative to the folder given."""
    out: list[tuple[Path, str]] = []
    for root in map(Path, paths):
        if root.is_dir():
            out += [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*")) if p.is_file()]
        elif root.is_file():
            out.append((root, root.name))
        else:
            raise FileNotFoundError(f"{root} does not exist")
    return out


def _series_key(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        key = f"{ds.get('StudyInstanceUID', '')}/{ds.get('SeriesInstanceUID', '')}"
        return key if key != "/" else None
    except Exception:
        return None


def predict_paths(
    model_uri: str, paths: Sequence[Path], *, params: dict[str, Any] | None = None, chunk: int = 64,
    tracking_uri: str | None = None, model_config: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score DICOM files and folders (recursive, any file name); ``chunk`` files are held in memory at a time.

    Returns ``slices`` (``file`` relative to the folder given, ``scan``, the model's output columns) and ``scans``
    (``scan``, ``slices``, ``errors``, ``out_of_distribution`` (slices flagged), ``max_p_blend_sign``, ``max_p_ich``
    = max of 1 − p_non_ich, ``top_file``).
    Scans are the files' series, named ``scan000``, ``scan001``… in file order: no original UID is returned;
    files without a series (unreadable) are scan ``""``.
    """
    model = load(model_uri, tracking_uri=tracking_uri, model_config=model_config)
    files = _files(paths)
    scan_names: dict[str, str] = {}
    parts: list[pd.DataFrame] = []
    for start in range(0, len(files), chunk):
        batch = files[start : start + chunk]
        blobs = [p.read_bytes() for p, _ in batch]
        scans = []
        for data in blobs:
            key = _series_key(data)
            if key is not None and key not in scan_names:
                scan_names[key] = f"scan{len(scan_names):03d}"
            scans.append("" if key is None else scan_names[key])
        out = model.predict(pd.DataFrame({DICOM_COLUMN: blobs}), params=params or {})
        out.insert(0, "scan", scans)
        out.insert(0, "file", [name for _, name in batch])
        parts.append(out.reset_index(drop=True))
        del blobs
    slices = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["file", "scan", *OUTPUT_COLUMNS])
    return slices, _aggregate(slices)


def _aggregate(slices: pd.DataFrame) -> pd.DataFrame:
    """Per scan: slices, errors, highest blend-sign probability, highest ICH probability, the file of the first."""
    rows = []
    for scan, group in slices.groupby("scan", sort=True):
        p_blend = group["p_blend_sign"].astype("float64")
        p_ich = 1.0 - group["p_non_ich"].astype("float64")
        ok = p_blend.notna()
        flagged = group["out_of_distribution"].astype("boolean") if "out_of_distribution" in group else None
        rows.append({
            "scan": scan,
            "slices": len(group),
            "errors": int(group["error"].notna().sum()),
            "out_of_distribution": int(flagged.fillna(False).sum()) if flagged is not None else 0,
            "max_p_blend_sign": float(p_blend.max()) if ok.any() else float("nan"),
            "max_p_ich": float(p_ich.max()) if ok.any() else float("nan"),
            "top_file": str(group.at[p_blend.idxmax(), "file"]) if ok.any() else None,
        })
    return pd.DataFrame(rows, columns=["scan", "slices", "errors", "out_of_distribution", "max_p_blend_sign",
                                       "max_p_ich", "top_file"])
