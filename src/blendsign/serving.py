"""The served model: an MLflow pyfunc that takes DICOM slices and returns class probabilities, boxes and Grad-CAM.

Weights travel as artifacts (``fold0.pt``, ``fold1.pt``, … slim ``train`` checkpoints: ``model`` state dict and
``config``), loaded in :meth:`BlendSignModel.load_context`; several checkpoints are a fold ensemble whose softmax
probabilities (and detection maps) are averaged. The logged model carries this package as code
(:mod:`blendsign.model_package`), so it loads where ``blendsign`` is not installed.

Input: a DataFrame with one row per slice and a column ``dicom`` holding the DICOM file as bytes, or as base64
text (what a JSON request carries). Output: one row per input row, in order (:data:`OUTPUT_COLUMNS`). A row that
cannot be used gets ``error`` set and missing (``<NA>``; ``null`` in JSON) probabilities; it never fails the others.
A request that cannot be scored at all (no ``dicom`` column, more rows than ``max_rows``) raises
:class:`RequestError`, whose message never repeats the request's content.

Settings (:class:`ServeSettings`): ``model_config`` at load time (``mlflow.pyfunc.load_model(uri,
model_config={"device": "cpu"})``), else the environment (``BLENDSIGN_SERVE_DEVICE``, ``BLENDSIGN_MAX_ROWS``,
``BLENDSIGN_SERVE_BATCH``), else the defaults.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pydicom
import torch
import torch.nn.functional as F
from mlflow.pyfunc import PythonModel  # (not mlflow.pyfunc.PythonModel: mypy sees a LazyLoader there)
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from torch import Tensor

from blendsign import CLASSES, ood
from blendsign.config import Config, DataConfig, IngestConfig
from blendsign.dicom import (
    PIXEL_DATA_TAGS,
    header_from_dataset,
    hu_from_dataset,
    missing_pixels_reason,
)
from blendsign.engine import resolve_device
from blendsign.errors import ConfigError, InputError, UnusableFileError
from blendsign.explain import cam_to_png, grad_cam
from blendsign.ingest import series_role
from blendsign.model import BlendSignNet, load_trained
from blendsign.targets import decode_boxes
from blendsign.transforms import Crop, crop_overlap, head_crop, preprocess, unscale_boxes, window

__all__ = [
    "DICOM_COLUMN", "OUTPUT_COLUMNS", "BlendSignModel", "RequestError", "ServeSettings", "read_slice",
    "to_model_input",
]  # fmt: skip

log = logging.getLogger(__name__)

DICOM_COLUMN = "dicom"
PROB_COLUMNS = tuple(f"p_{c}" for c in CLASSES)
OOD_COLUMNS = ("ood_score", "out_of_distribution")  # blendsign.ood: score / threshold, and score > 1
OUTPUT_COLUMNS = (*PROB_COLUMNS, "label", "boxes", *OOD_COLUMNS, "error")
GRADCAM_COLUMN = "gradcam_png"
_DTYPES = {**dict.fromkeys(PROB_COLUMNS, "Float64"), "ood_score": "Float64", "out_of_distribution": "boolean"}
MAX_SIDE = 4096  # larger slices are refused before their pixels are decoded (CT is 512², rarely 1024²)
DEFAULT_BATCH_SIZE = 8  # slices per forward pass: bounds memory whatever the request size
BOX_THRESHOLD = 0.3  # center probability of a reported box (targets.decode_boxes' default)


@dataclass(frozen=True)
class ServeSettings:
    """How the pyfunc runs where it is served (not part of the model: the same model serves on CPU or GPU).

    ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` (a CUDA request without a usable
    GPU is an error, never a silent CPU fallback); ``max_rows``: slices per request (a 40-slice scan is one
    request, a 0.625 mm series of 16 cm too); ``batch_size``: slices per forward pass (bounds GPU memory).
    """

    device: str = "auto"
    max_rows: int = 256
    batch_size: int = DEFAULT_BATCH_SIZE

    ENV: ClassVar[dict[str, str]] = {"device": "BLENDSIGN_SERVE_DEVICE", "max_rows": "BLENDSIGN_MAX_ROWS",
                                     "batch_size": "BLENDSIGN_SERVE_BATCH"}

    @classmethod
    def resolve(cls, model_config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                base: ServeSettings | None = None) -> ServeSettings:
        """``model_config`` keys over environment variables over ``base`` (the defaults); bad values are errors."""
        env = os.environ if env is None else env
        base = base or cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = (model_config or {}).get(f.name)
            if raw is None or raw == "":  # the logged model's keys are empty: the server's environment decides
                raw = env.get(cls.ENV[f.name])
            if raw is None or raw == "":
                values[f.name] = getattr(base, f.name)
            elif f.name == "device":
                values[f.name] = str(raw)
            else:
                try:
                    values[f.name] = int(raw)
                except (TypeError, ValueError):
                    raise ConfigError(f"serving setting {f.name} ({cls.ENV[f.name]}) must be an integer, got "
                                     f"{raw!r}") from None
                if values[f.name] < 1:
                    raise ConfigError(f"serving setting {f.name} ({cls.ENV[f.name]}) must be ≥ 1, got {raw!r}")
        return cls(**values)


class RowError(Exception):
    """A row that cannot be scored; the message is returned in its ``error`` column."""


# Messages of the request errors raised in this context: the HTTP front (blendsign.model_server) reads them to
# answer with this text alone, since MLflow's scoring server wraps an exception's message around the request data.
REQUEST_ERRORS: ContextVar[list[str] | None] = ContextVar("blendsign_request_errors", default=None)


class RequestError(InputError):
    """A request that cannot be scored at all (HTTP 400). The message states the problem, never the content."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        sink = REQUEST_ERRORS.get()
        if sink is not None:
            sink.append(message)


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
    data = _as_bytes(value)
    ds = _dataset(data)
    if "PixelData" not in ds and any(tag in data for tag in PIXEL_DATA_TAGS):  # cut inside Pixel Data: pydicom drops it
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        raise RowError(missing_pixels_reason(ts.name if ts else "unknown transfer syntax", True))
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


def to_model_input(hu: np.ndarray, cfg: DataConfig, crop: Crop | None = None) -> Tensor:
    """HU ``[rows, cols]`` → model input ``[3, size, size]``: exactly :func:`blendsign.transforms.preprocess`
    (``crop``: the slice's :func:`~blendsign.transforms.head_crop`, if already known)."""
    hu = np.ascontiguousarray(hu)
    return preprocess(torch.from_numpy(hu if hu.flags.writeable else hu.copy()), cfg, crop)  # torch wants writable


# --- the ensemble ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ensemble:
    models: tuple[BlendSignNet, ...]
    data: DataConfig
    ingest: IngestConfig  # which images the models were trained on
    stride: int
    device: torch.device
    ood: tuple[dict[str, Any] | None, ...]  # per model (blendsign.ood); None: a checkpoint without one

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [N, 3, S, S]`` (on ``device``) → mean softmax ``[N, K]``, mean detection map ``[N, 5, h, w]``
        (channel 0 a logit) and the members' mean OOD score ``[N]`` (each relative to its own threshold; NaN
        when a member has no OOD state), on the CPU."""
        probs, heat, dist, ood_scores = [], [], [], []
        for model, state in zip(self.models, self.ood, strict=True):
            out = model(x, stage_stats=state is not None)
            probs.append(out["logits"].float().softmax(dim=1))
            heat.append(out["det"][:, :1].float())
            dist.append(out["det"][:, 1:].float())
            ood_scores.append(ood.score(state, out["stage_stats"]) if state is not None
                              else torch.full((len(x),), math.nan, device=x.device))
        score = torch.stack(ood_scores).mean(dim=0).cpu()
        if len(self.models) == 1:
            return probs[0].cpu(), torch.cat([heat[0], dist[0]], dim=1).cpu(), score
        center = torch.stack(heat).sigmoid().mean(dim=0).logit(eps=1e-6)  # average probabilities, back to a logit
        det = torch.cat([center, torch.stack(dist).mean(dim=0)], dim=1).cpu()
        return torch.stack(probs).mean(dim=0).cpu(), det, score

    def cam(self, x: Tensor, target: int) -> Tensor:
        """Grad-CAM ``[S, S]`` in [0, 1] of one input ``x [3, S, S]`` for class ``target``, averaged over members."""
        total = sum(grad_cam(m, x, target_class=target)[0] for m in self.models)
        assert isinstance(total, Tensor)  # (sum's start, 0, makes it Tensor | int to the type checker)
        peak = float(total.max())
        return (total / peak if peak > 0 else total).cpu()


def check_compatible(configs: Sequence[Config]) -> None:
    """Ensemble members must share their preprocessing and detection grid (their maps are averaged)."""
    first = configs[0]
    for cfg in configs[1:]:
        if cfg.data.size != first.data.size or cfg.data.windows != first.data.windows:
            raise InputError("ensemble checkpoints differ in preprocessing (data.size / data.windows)")
        if cfg.model.backbone != first.model.backbone or cfg.model.num_classes != first.model.num_classes:
            raise InputError("ensemble checkpoints differ in backbone or number of classes")


class BlendSignModel(PythonModel):
    """The pyfunc. Its pickled state is only its default settings; the networks are built in :meth:`load_context`.

    ``predict(context, df, params)``: ``df`` has a column ``dicom`` (bytes or base64 text), one row per slice;
    ``params={"explain": True}`` adds ``gradcam_png``. Returns one row per input row: ``p_non_ich``,
    ``p_normal_ich``, ``p_blend_sign`` (Float64, ``<NA>`` on error), ``label`` (class name), ``boxes`` (list of
    ``[x_min, y_min, x_max, y_max, score]`` in pixels of the input slice), ``error`` (``None`` or the reason), and
    with ``explain`` ``gradcam_png`` (base64 PNG of the slice's brain window with the predicted class's Grad-CAM,
    at the slice's own size).
    """

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.settings = ServeSettings(batch_size=int(batch_size))
        self._ensemble: _Ensemble | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"batch_size": self.settings.batch_size}  # never pickle live networks

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings = ServeSettings(batch_size=int(state.get("batch_size", DEFAULT_BATCH_SIZE)))
        self._ensemble = None

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def device(self) -> torch.device | None:
        """Where the networks run (``None`` before loading)."""
        return None if self._ensemble is None else self._ensemble.device

    def load_context(self, context: Any) -> None:
        self.settings = ServeSettings.resolve(getattr(context, "model_config", None), base=self.settings)
        paths = [context.artifacts[k] for k in sorted(context.artifacts, key=_fold_number)]
        self.load_checkpoints(paths)

    def load_checkpoints(self, paths: Sequence[str | Path], device: str | None = None) -> None:
        """Build the ensemble from checkpoint files (what ``load_context`` does with the artifacts) on ``device``
        (default: the settings' device)."""
        if not paths:
            raise InputError("no checkpoints to serve")
        target = resolve_device(device or self.settings.device)
        loaded = [load_trained(p, target) for p in paths]
        check_compatible([cfg for _, cfg, _ in loaded])
        models = tuple(m for m, _, _ in loaded)
        cfg = loaded[0][1]
        self._ensemble = _Ensemble(models, cfg.data, cfg.ingest, models[0].stride, target,
                                   tuple(state for _, _, state in loaded))
        if any(state is None for _, _, state in loaded):
            log.warning("a checkpoint has no out-of-distribution statistics (trained before they existed): "
                        "ood_score is empty and no slice is flagged")
        where = torch.cuda.get_device_name(target) if target.type == "cuda" else "CPU"
        log.info("serving %d trained %s model(s) (preset %s) on %s (%s), %d slices per forward pass, at most %d "
                 "per request", len(models), cfg.model.backbone, cfg.preset, target, where, self.batch_size,
                 self.settings.max_rows)

    @property
    def data_config(self) -> DataConfig:
        """The preprocessing the loaded networks were trained with (:func:`to_model_input` takes it)."""
        return self._loaded().data

    def probabilities(self, x: Tensor) -> np.ndarray:
        """Preprocessed slices ``x [N, 3, S, S]`` → the ensemble's class probabilities ``[N, K]``."""
        ens = self._loaded()
        probs, _, _ = ens(x.to(ens.device))
        return probs.numpy()

    def _loaded(self) -> _Ensemble:
        if self._ensemble is None:
            raise RuntimeError("model not loaded: load it with mlflow.pyfunc.load_model (or load_checkpoints)")
        return self._ensemble

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        ens = self._loaded()
        explain = _truthy((params or {}).get("explain", False))
        if DICOM_COLUMN not in model_input.columns:
            raise RequestError(f"input needs a column {DICOM_COLUMN!r} (DICOM bytes or base64 text), one row per "
                               f"slice; got {len(model_input.columns)} other column(s)")
        if len(model_input) > self.settings.max_rows:
            raise RequestError(f"{len(model_input)} slices in one request: at most {self.settings.max_rows} "
                               f"(serving setting max_rows, {ServeSettings.ENV['max_rows']}); send a scan in parts")
        values = model_input[DICOM_COLUMN].tolist()
        rows = [self._empty_row(explain) for _ in values]
        step = self.batch_size
        for start in range(0, len(values), step):
            self._score(ens, values[start : start + step], rows[start : start + step], explain)
        columns = [*OUTPUT_COLUMNS, *([GRADCAM_COLUMN] if explain else [])]
        return pd.DataFrame(
            {  # probabilities Float64: missing → <NA> in pandas, null in JSON (NaN is not JSON); text stays object
                c: pd.Series([r[c] for r in rows], dtype=_DTYPES.get(c, object), index=model_input.index)
                for c in columns
            },
            index=model_input.index,
        )

    @staticmethod
    def _empty_row(explain: bool) -> dict[str, Any]:
        row: dict[str, Any] = {c: None for c in PROB_COLUMNS}
        row.update(label=None, boxes=[], ood_score=None, out_of_distribution=None, error=None)
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
        crops: list[Crop | None] = []
        for i, value in enumerate(values):
            try:
                hu = read_slice(value, ens.ingest)
                crop = head_crop(torch.from_numpy(hu), ens.data)
                inputs.append(to_model_input(hu, ens.data, crop))
            except RowError as exc:
                rows[i]["error"] = str(exc)
                continue
            except Exception as exc:  # anything unforeseen stays this row's problem
                rows[i]["error"] = f"cannot use this slice ({type(exc).__name__})"
                continue
            good.append(i)
            shapes.append(hu.shape)
            crops.append(crop)
            slices.append(hu if explain else None)
        if not good:
            return
        x = torch.stack(inputs).to(ens.device)  # [B, 3, S, S]
        probs, det, ood_score = ens(x)  # [B, K], [B, 5, h, w], [B] on the CPU
        size = ens.data.size
        for b, i in enumerate(good):
            p = probs[b].tolist()
            k = int(probs[b].argmax())
            rows_px, cols_px = shapes[b]
            boxes = decode_boxes(det[b], stride=ens.stride, threshold=BOX_THRESHOLD)  # [M, 5] model-input px
            native = unscale_boxes(boxes, rows_px, cols_px, size, crops[b])  # [M, 5] slice px
            rows[i].update(
                {c: float(v) for c, v in zip(PROB_COLUMNS, p, strict=True)},
                label=CLASSES[k],
                boxes=[[round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2), round(s, 4)]
                       for x0, y0, x1, y1, s in native.tolist()],
            )
            score = float(ood_score[b])
            if not math.isnan(score):
                rows[i].update(ood_score=score, out_of_distribution=score > 1.0)
            explained = slices[b]
            if explained is not None:
                rows[i][GRADCAM_COLUMN] = _gradcam_png(ens, x[b], k, explained, crops[b])


def _gradcam_png(ens: _Ensemble, x: Tensor, target: int, hu: np.ndarray, crop: Crop | None) -> str:
    """Base64 PNG ``rows × cols``: the slice's brain window (native resolution) under the class's Grad-CAM
    (mapped back from the head's square when the model crops; zero outside it)."""
    cam = ens.cam(x, target)  # [S, S]
    rows, cols = hu.shape
    if crop is None:
        cam = F.interpolate(cam[None, None], size=(rows, cols), mode="bilinear", align_corners=False)[0, 0]
    else:
        side = crop[2]
        square = F.interpolate(cam[None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        in_slice, in_square = crop_overlap(crop, rows, cols)
        cam = torch.zeros(rows, cols)
        cam[in_slice] = square[in_square]
    cam = cam.clamp(0, 1)
    image = window(torch.from_numpy(np.ascontiguousarray(hu)), ens.data.windows)  # [3, rows, cols]
    return base64.b64encode(cam_to_png(image, cam)).decode("ascii")


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def member_name(k: int) -> str:
    """The artifact name of ensemble member ``k`` of a registered model (:mod:`blendsign.model_package`)."""
    return f"fold{k}"


def _fold_number(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else 0, name)
