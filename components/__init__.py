"""Kubeflow Pipelines v2 components: one thin wrapper per stage over the library (see ``stages.py``)."""

from components.images import BASE_IMAGE, CPU_IMAGE
from components.stages import (
    STAGES,
    check_new_data,
    distill,
    evaluate,
    folds,
    fuse,
    ingest,
    no_new_data,
    register,
    snapshot,
    start_run,
    train_teacher,
)

__all__ = [
    "BASE_IMAGE",
    "CPU_IMAGE",
    "STAGES",
    "check_new_data",
    "distill",
    "evaluate",
    "folds",
    "fuse",
    "ingest",
    "no_new_data",
    "register",
    "snapshot",
    "start_run",
    "train_teacher",
]
