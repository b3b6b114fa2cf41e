"""The checkpoint format: what ``train`` writes and every other stage reads.

A checkpoint is a ``torch.save``\\ d dict:

- ``format`` (:data:`FORMAT`), ``model`` (the :class:`~blendsign.model.BlendSignNet` state dict), ``config``
  (``Config.to_dict()``), ``fold`` (None: a refit on all data), ``epoch``;
- to resume (``last.pt`` only): ``optimizer``, ``scheduler``, ``scaler``; and ``history`` (per-epoch metrics),
  ``run_id`` (the MLflow run), ``trained_on`` (``{"data": digest, "teacher": digest or None}``);
- ``ood``: the out-of-distribution statistics (:mod:`blendsign.ood`), fitted once training ends.

A training folder holds :data:`LAST` (every epoch, to resume) and :data:`MODEL` (the trained model: the final
epoch's weights, paper §Training details, without optimiser state). Registered models ship :func:`write_slim`
copies. Every file is read with ``weights_only=True``: tensors and plain data, no pickled code, so opening a
checkpoint from a shared bucket runs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blendsign.config import Config
from blendsign.errors import InputError
from blendsign.storage import atomic_path

FORMAT = 1
LAST, MODEL = "last.pt", "model.pt"
RESUME_ONLY = ("optimizer", "scheduler", "scaler")  # dropped from model.pt
SERVED = ("format", "model", "config", "fold", "epoch", "ood")  # what a registered model's copy keeps


def save(state: Mapping[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` in one step (a killed run leaves the previous file)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's dict, on the CPU; ``mmap=True`` maps the tensors instead of reading them (for its metadata).

    Raises ``InputError`` for a file that is not a blendsign checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types on a truncated or foreign file
        raise InputError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"{path} is not a blendsign train checkpoint (needs keys 'model' and 'config')")
    return state


def model_only(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without what only resuming needs (:data:`RESUME_ONLY`): the content of ``model.pt``."""
    return {**state, **dict.fromkeys(RESUME_ONLY)}


def config_of(state: Mapping[str, Any]) -> Config:
    return Config.from_dict(state["config"])


def trained_on(path: str | Path) -> dict[str, str | None]:
    """What a checkpoint's model was trained on: ``{"data": digest, "teacher": digest or None}``, with ``"init"``
    (the sha256 of the checkpoint it started from) when it did not start from its config's weights."""
    return load(path, mmap=True).get("trained_on") or {}


def ood_state(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint's out-of-distribution statistics (None in one from before they existed)."""
    return load(path, mmap=True).get("ood")


def write_slim(src: str | Path, dst: str | Path) -> Config:
    """Write the part of checkpoint ``src`` that serving needs (:data:`SERVED`) to ``dst``; its config."""
    state = load(src)
    save({"format": FORMAT, **{k: state.get(k) for k in SERVED if k != "format"}}, dst)
    return config_of(state)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a weights file: a plain (torchvision-style) one, or the ``model`` of a checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path} is not a readable weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return dict(state)
