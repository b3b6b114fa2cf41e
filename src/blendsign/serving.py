"""The served model: an MLflow pyfunc that takes DICOM slices and returns class probabilities, boxes and Grad-CAM.

Weights travel as artifacts (``fold0.pt``, ``fold1.pt``, … slim ``train`` checkpoints: ``model`` state dict and
``config``), loaded in :meth:`BlendSignModel.load_context`; several checkpoints are a fold ensemble whose softmax
probabilities (and detection maps) are averaged. The package must be installed where the model is served (the
pyfunc pickles :class:`BlendSignModel` by reference and imports ``blendsign``); no ``code_paths`` are logged.

Input: a DataFrame with one row per slice and a column ``dicom`` holding the DICOM file as bytes, or as base64
text (what a JSON request carries). Output: one row per input row, in order (:data:`OUTPUT_COLUMNS`). A row that
cannot be used gets ``error`` set and missing (``<NA>``; ``null`` in JSON) probabilities; it never fails the others.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from torch import Tensor

from blendsign import CLASSES, __version__
from blendsign.config import Config, DataConfig, IngestConfig
from blendsign.dicom import UnusableFileError, header_from_dataset, hu_from_dataset
from blendsign.explain import cam_to_png, grad_cam
from blendsign.ingest import series_role
from blendsign.model import BlendSignNet, build_model
from blendsign.targets import decode_boxes
from blendsign.transforms import preprocess, window

__all__ = [
    "DICOM_COLUMN", "OUTPUT_COLUMNS", "BlendSignModel", "load", "log_model", "predict_paths",
    "read_slice", "signature", "to_model_input",
]  # fmt: skip

DICOM_COLUMN = "dicom"
PROB_COLUMNS = tuple(f"p_{c}" for c in CLASSES)
OUTPUT_COLUMNS = (*PROB_COLUMNS, "label", "boxes", "error")
GRADCAM_COLUMN = "gradcam_png"
MAX_SIDE = 4096  # larger slices are refused before their pixels are decoded (CT is 512², rarely 1024²)
DEFAULT_BATCH_SIZE = 8  # slices per forward pass: bounds memory whatever the request size
BOX_THRESHOLD = 0.3  # center probability of a reported box (targets.decode_boxes' default)


class RowError(Exception):
    """A row that cannot be scored; the message is returned in its ``error`` column."""


# --- one slice -----------------------------------------------------------------------------------------


def _as_bytes(value: Any) -> bytes:
    """DICOM bytes from a cell: bytes as they are, text as base64 (whitespace and line breaks ignored)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RowError("not valid base64 text") from None
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        raise RowError("empty value")
    raise RowError(f"expected DICOM bytes or base64 text, got {type(value).__name__}")


def _dataset(data: bytes) -> Dataset:
    if not data:
        raise RowError("empty value")
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        pass  # no preamble / 'DICM': still DICOM if a forced read finds an image header
    except Exception as exc:
        raise RowError(f"unreadable DICOM ({type(exc).__name__})") from None
    try:
        with warnings.catch_warnings():  # pydicom warns about whatever it finds in non-DICOM bytes
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        raise RowError("not a DICOM file") from None
    if "SOPClassUID" not in ds or "Modality" not in ds:
        raise RowError("not a DICOM file")
    return ds


def read_slice(value: Any, ingest: IngestConfig | None = None) -> np.ndarray:
    """One cell (DICOM bytes or base64 text) → HU ``[rows, cols]`` int16, as training reads it.

    Raises ``RowError`` with the reason (not DICOM, not CT, an image ingestion sets aside under ``ingest``'s
    rules — a localizer, a contrast-enhanced or non-axial series —, no pixel data, undecodable, absurd size, …).
    """
    ds = _dataset(_as_bytes(value))
    modality = str(ds.get("Modality", "") or "").upper()
    if modality != "CT":
        raise RowError(f"not a CT image (Modality {modality or 'missing'})")
    if "PixelData" not in ds:
        raise RowError("no pixel data")
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise RowError("malformed image header") from None
    if not (1 <= rows <= MAX_SIDE and 1 <= cols <= MAX_SIDE):
        raise RowError(f"image size {rows}×{cols} outside 1–{MAX_SIDE} px")
    if frames != 1 or samples != 1:
        raise RowError(f"expected one grey 2-D frame, got {frames} frame(s) of {samples} sample(s)")
    try:
        role = series_role([header_from_dataset(ds, "request")], ingest or IngestConfig())
    except UnusableFileError as exc:
        raise RowError(str(exc)) from None
    if role != "axial":
        raise RowError(f"{role.replace('_', '-')} image: the model reads non-contrast axial CT slices, the ones "
                       "ingestion keeps")
    try:
        return hu_from_dataset(ds)
    except UnusableFileError as exc:
        raise RowError(str(exc)) from None
    except Exception as exc:
        raise RowError(f"pixel data cannot be decoded ({type(exc).__name__})") from None


def to_model_input(hu: np.ndarray, cfg: DataConfig) -> Tensor:
    """HU ``[rows, cols]`` → model input ``[3, size, size]``: exactly :func:`blendsign.transforms.preprocess`."""
    return preprocess(torch.from_numpy(np.ascontiguousarray(hu)), cfg)


# --- the ensemble ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ensemble:
    models: tuple[BlendSignNet, ...]
    data: DataConfig
    ingest: IngestConfig  # which images the models were trained on
    stride: int

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [N, 3, S, S]`` → mean softmax ``[N, K]`` and mean detection map ``[N, 5, h, w]`` (channel 0 a logit)."""
        probs, heat, dist = [], [], []
        for model in self.models:
            out = model(x)
            probs.append(out["logits"].float().softmax(dim=1))
            heat.append(out["det"][:, :1].float())
            dist.append(out["det"][:, 1:].float())
        if len(self.models) == 1:
            return probs[0], torch.cat([heat[0], dist[0]], dim=1)
        center = torch.stack(heat).sigmoid().mean(dim=0).logit(eps=1e-6)  # average probabilities, back to a logit
        return torch.stack(probs).mean(dim=0), torch.cat([center, torch.stack(dist).mean(dim=0)], dim=1)

    def cam(self, x: Tensor, target: int) -> Tensor:
        """Grad-CAM ``[S, S]`` in [0, 1] of one input ``x [3, S, S]`` for class ``target``, averaged over members."""
        total = sum(grad_cam(m, x, target_class=target)[0] for m in self.models)
        peak = float(total.max())  # type: ignore[union-attr]
        return total / peak if peak > 0 else total  # type: ignore[return-value, operator]


def _load_checkpoint(path: str | Path) -> tuple[BlendSignNet, Config]:
    """A served checkpoint (``model`` state dict + ``config``) → model in eval mode, parameters frozen."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # artifacts hold tensors and plain data only
    cfg = Config.from_dict(state["config"])
    model = build_model(replace(cfg.model, weights="none"))
    model.load_state_dict(state["model"])
    model.eval().requires_grad_(False)
    return model, cfg


def _check_compatible(configs: Sequence[Config]) -> None:
    """Ensemble members must share their preprocessing and detection grid (their maps are averaged)."""
    first = configs[0]
    for cfg in configs[1:]:
        if cfg.data.size != first.data.size or cfg.data.windows != first.data.windows:
            raise ValueError("ensemble checkpoints differ in preprocessing (data.size / data.windows)")
        if cfg.model.backbone != first.model.backbone or cfg.model.num_classes != first.model.num_classes:
            raise ValueError("ensemble checkpoints differ in backbone or number of classes")


class BlendSignModel(mlflow.pyfunc.PythonModel):
    """The pyfunc. Its pickled state is only ``batch_size``; the networks are built in :meth:`load_context`.

    ``predict(context, df, params)``: ``df`` has a column ``dicom`` (bytes or base64 text), one row per slice;
    ``params={"explain": True}`` adds ``gradcam_png``. Returns one row per input row: ``p_non_ich``,
    ``p_normal_ich``, ``p_blend_sign`` (Float64, ``<NA>`` on error), ``label`` (class name), ``boxes`` (list of
    ``[x_min, y_min, x_max, y_max, score]`` in pixels of the input slice), ``error`` (``None`` or the reason), and
    with ``explain`` ``gradcam_png`` (base64 PNG of the slice's brain window with the predicted class's Grad-CAM,
    at the slice's own size).
    """

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.batch_size = int(batch_size)
        self._ensemble: _Ensemble | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}  # never pickle live networks

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.batch_size = int(state.get("batch_size", DEFAULT_BATCH_SIZE))
        self._ensemble = None

    def load_context(self, context: Any) -> None:
        paths = [context.artifacts[k] for k in sorted(context.artifacts, key=_fold_number)]
        self.load_checkpoints(paths)

    def load_checkpoints(self, paths: Sequence[str | Path]) -> None:
        """Build the ensemble from checkpoint files (what ``load_context`` does with the artifacts)."""
        if not paths:
            raise ValueError("no checkpoints to serve")
        loaded = [_load_checkpoint(p) for p in paths]
        _check_compatible([cfg for _, cfg in loaded])
        models = tuple(m for m, _ in loaded)
        self._ensemble = _Ensemble(models, loaded[0][1].data, loaded[0][1].ingest, models[0].stride)

    def _loaded(self) -> _Ensemble:
        if self._ensemble is None:
            raise RuntimeError("model not loaded: load it with mlflow.pyfunc.load_model (or load_checkpoints)")
        return self._ensemble

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        ens = self._loaded()
        explain = _truthy((params or {}).get("explain", False))
        if DICOM_COLUMN not in model_input.columns:
            raise ValueError(f"input needs a column {DICOM_COLUMN!r} (DICOM bytes or base64 text)")
        values = model_input[DICOM_COLUMN].tolist()
        rows = [self._empty_row(explain) for _ in values]
        for start in range(0, len(values), max(1, self.batch_size)):
            self._score(ens, values[start : start + self.batch_size], rows[start : start + self.batch_size], explain)
        columns = [*OUTPUT_COLUMNS, *([GRADCAM_COLUMN] if explain else [])]
        return pd.DataFrame(
            {  # probabilities Float64: missing → <NA> in pandas, null in JSON (NaN is not JSON); text stays object
                c: pd.Series([r[c] for r in rows], dtype="Float64" if c in PROB_COLUMNS else object,
                             index=model_input.index)
                for c in columns
            },
            index=model_input.index,
        )

    @staticmethod
    def _empty_row(explain: bool) -> dict[str, Any]:
        row: dict[str, Any] = {c: None for c in PROB_COLUMNS}
        row.update(label=None, boxes=[], error=None)
        if explain:
            row[GRADCAM_COLUMN] = None
        return row

    @staticmethod
    def _score(ens: _Ensemble, values: list[Any], rows: list[dict[str, Any]], explain: bool) -> None:
        """Score one batch in place: decode each row (errors stay per row), one forward pass for the good ones."""
        good: list[int] = []
        inputs: list[Tensor] = []
        slices: list[np.ndarray | None] = []
        shapes: list[tuple[int, int]] = []
        for i, value in enumerate(values):
            try:
                hu = read_slice(value, ens.ingest)
                inputs.append(to_model_input(hu, ens.data))
            except RowError as exc:
                rows[i]["error"] = str(exc)
                continue
            except Exception as exc:  # anything unforeseen stays this row's problem
                rows[i]["error"] = f"cannot use this slice ({type(exc).__name__})"
                continue
            good.append(i)
            shapes.append(hu.shape)
            slices.append(hu if explain else None)
        if not good:
            return
        x = torch.stack(inputs)  # [B, 3, S, S]
        probs, det = ens(x)  # [B, K], [B, 5, h, w]
        size = ens.data.size
        for b, i in enumerate(good):
            p = probs[b].tolist()
            k = int(probs[b].argmax())
            rows_px, cols_px = shapes[b]
            boxes = decode_boxes(det[b], stride=ens.stride, threshold=BOX_THRESHOLD)  # [M, 5] model-input px
            sx, sy = cols_px / size, rows_px / size
            rows[i].update(
                {c: float(v) for c, v in zip(PROB_COLUMNS, p, strict=True)},
                label=CLASSES[k],
                boxes=[[round(x0 * sx, 2), round(y0 * sy, 2), round(x1 * sx, 2), round(y1 * sy, 2), round(s, 4)]
                       for x0, y0, x1, y1, s in boxes.tolist()],
            )
            hu = slices[b]
            if hu is not None:
                rows[i][GRADCAM_COLUMN] = _gradcam_png(ens, x[b], k, hu)


def _gradcam_png(ens: _Ensemble, x: Tensor, target: int, hu: np.ndarray) -> str:
    """Base64 PNG ``rows × cols``: the slice's brain window (native resolution) under the class's Grad-CAM."""
    cam = ens.cam(x, target)  # [S, S]
    rows, cols = hu.shape
    cam = F.interpolate(cam[None, None], size=(rows, cols), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    image = window(torch.from_numpy(np.ascontiguousarray(hu)), ens.data.windows)  # [3, rows, cols]
    return base64.b64encode(cam_to_png(image, cam)).decode("ascii")


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _fold_number(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else 0, name)


# --- MLflow --------------------------------------------------------------------------------------------


def signature() -> Any:
    """The model signature: input ``dicom`` (string: base64 text, or bytes in process), the output columns and
    the ``explain`` parameter (boolean, default False)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    # ``string``, not ``binary``: MLflow base64-decodes a binary column for the whole request at once, so one bad
    # row would fail every row with HTTP 400; as a string each row is decoded (and may fail) on its own.
    inputs = Schema([ColSpec(DataType.string, DICOM_COLUMN)])
    outputs = Schema([
        *(ColSpec(DataType.double, c, required=False) for c in PROB_COLUMNS),
        ColSpec(DataType.string, "label", required=False),
        ColSpec(Array(Array(DataType.double)), "boxes", required=False),
        ColSpec(DataType.string, "error", required=False),
        ColSpec(DataType.string, GRADCAM_COLUMN, required=False),
    ])
    params = ParamSchema([ParamSpec("explain", DataType.boolean, False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def example_slice() -> bytes:
    """A real non-contrast head-CT slice (512², JPEG 2000 lossless): pydicom's bundled
    ``J2K_pixelrep_mismatch.dcm`` (no download). ``CT_small.dcm`` is contrast-enhanced: the model declines it."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("J2K_pixelrep_mismatch.dcm")
    if path is None:
        raise FileNotFoundError("pydicom's J2K_pixelrep_mismatch.dcm test file is missing")
    return Path(str(path)).read_bytes()


def requirements() -> list[str]:
    """Pinned runtime requirements of the served model (``blendsign`` itself is installed by the image)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["mlflow", "torch", "torchvision", "numpy", "pandas", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg",
             "pylibjpeg-rle", "pillow", "matplotlib"]  # fmt: skip
    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


@contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the block; restore it (and the env variable) after."""
    from mlflow.tracking._tracking_service import utils

    previous, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  (None = unset, as before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _slim_copy(src: Path, dst: Path) -> Config:
    """Write the part of a ``train`` checkpoint that serving needs (``model``, ``config``) to ``dst``."""
    state = torch.load(src, map_location="cpu", weights_only=False)  # our own training output
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{src} is not a blendsign train checkpoint (needs keys 'model' and 'config')")
    torch.save({"format": state.get("format", 1), "model": state["model"], "config": state["config"],
                "fold": state.get("fold"), "epoch": state.get("epoch")}, dst)
    return Config.from_dict(state["config"])


def log_model(
    *,
    run_id: str,
    tracking_uri: str,
    checkpoints: Sequence[Path],
    name: str = "model",
    registered_model_name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> str:
    """Log the served model (fold ensemble of ``checkpoints``) to the existing run ``run_id``; returns its URI.

    The checkpoints are copied (model + config only) as artifacts ``fold0.pt``, ``fold1.pt``, …; the input
    example is one real CT slice (base64). MLflow loads the model once to check the example. A run that was
    RUNNING before stays RUNNING.
    """
    if not checkpoints:
        raise ValueError("log_model needs at least one checkpoint")
    example = pd.DataFrame({DICOM_COLUMN: [base64.b64encode(example_slice()).decode("ascii")]})
    with tempfile.TemporaryDirectory(prefix="blendsign-serve-") as tmp:
        artifacts: dict[str, str] = {}
        configs = []
        for k, src in enumerate(checkpoints):
            dst = Path(tmp) / f"fold{k}.pt"
            configs.append(_slim_copy(Path(src), dst))
            artifacts[f"fold{k}"] = str(dst)
        _check_compatible(configs)
        with _tracking(tracking_uri):
            client = mlflow.MlflowClient(tracking_uri)
            was_running = client.get_run(run_id).info.status == "RUNNING"
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=BlendSignModel(batch_size=batch_size),
                    artifacts=artifacts,
                    signature=signature(),
                    input_example=(example, {"explain": False}),
                    pip_requirements=requirements(),
                    registered_model_name=registered_model_name,
                    metadata={"blendsign_version": __version__, "classes": list(CLASSES),
                              "folds": len(configs), "preset": configs[0].preset},
                )
            if was_running:
                client.update_run(run_id, status="RUNNING")
    return str(info.model_uri)


def load(model_uri: str, *, tracking_uri: str | None = None) -> Any:
    """The served model in process (``mlflow.pyfunc.PyFuncModel``): ``.predict(df, params={"explain": True})``.

    ``tracking_uri`` resolves ``models:/`` and ``runs:/`` URIs (default: MLflow's, i.e. ``MLFLOW_TRACKING_URI``).
    """
    if tracking_uri is None:
        return mlflow.pyfunc.load_model(model_uri)
    # download_artifacts(tracking_uri=...) ignores it for ``models:/m-…`` URIs (MLflow 3.17): set it globally.
    with _tracking(tracking_uri):
        return mlflow.pyfunc.load_model(model_uri)


# --- files and folders (CLI) ----------------------------------------------------------------------------


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
    tracking_uri: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score DICOM files and folders (recursive, any file name); ``chunk`` files are held in memory at a time.

    Returns ``slices`` (``file`` relative to the folder given, ``scan``, the model's output columns) and ``scans``
    (``scan``, ``slices``, ``errors``, ``max_p_blend_sign``, ``max_p_ich`` = max of 1 − p_non_ich, ``top_file``).
    Scans are the files' series, named ``scan000``, ``scan001``… in file order: no original UID is returned;
    files without a series (unreadable) are scan ``""``.
    """
    model = load(model_uri, tracking_uri=tracking_uri)
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
        rows.append({
            "scan": scan,
            "slices": len(group),
            "errors": int(group["error"].notna().sum()),
            "max_p_blend_sign": float(p_blend.max()) if ok.any() else float("nan"),
            "max_p_ich": float(p_ich.max()) if ok.any() else float("nan"),
            "top_file": str(group.loc[p_blend.idxmax(), "file"]) if ok.any() else None,
        })
    return pd.DataFrame(rows, columns=["scan", "slices", "errors", "max_p_blend_sign", "max_p_ich", "top_file"])


@contextmanager
def model_server(model_uri: str, *, tracking_uri: str, log: str | Path, timeout: int = 600,
                 startup: float = 180.0) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` on 127.0.0.1 (a free port) for the block; yields its base URL.

    The environment's ``bin`` goes on ``PATH`` (the server execs ``uvicorn``), the request timeout is
    ``timeout`` seconds (MLflow's 60 s default cuts off a CPU scan), output goes to ``log``. The server runs
    in its own process group (not its own session: that would give it its own CPU autogroup, a larger share
    of a busy machine) and the whole group is stopped on exit. ``RuntimeError`` with the log's tail if it
    exits or is not up within ``startup`` seconds.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = Path(log)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "-p", str(port), "--timeout", str(timeout)],
            env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0, cwd=log.parent)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"model server exited ({proc.returncode}): {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"model server not up in {startup:.0f} s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
