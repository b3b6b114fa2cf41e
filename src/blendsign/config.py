"""The one typed configuration of blendsign.

Every default is the paper's value where the paper gives one (section cited beside it), otherwise a
documented engineering choice. Presets (``paper``, ``demo``, ``ci``) only override fields; the same
object is logged to MLflow and stored in checkpoints (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic head-CT cohort (``blendsign synth``)."""

    scans: int = 40  # studies to generate (a few extra are made to be excluded)
    size: int = 512  # rows = cols of each slice (paper §Data pre-processing: 512×512 model input)
    slices_per_scan: tuple[int, int] = (8, 12)  # paper: 13,276 slices / 1,614 scans ≈ 8.2 per scan
    slice_thickness_mm: float = 5.0  # routine head CT reconstruction
    class_ratio: tuple[float, float, float] = (22.0, 9.0, 1.0)  # non_ich:normal_ich:blend_sign (paper: ≈22:9:1)
    rle_share: float = 0.15  # share of series written RLE Lossless compressed
    seed: int = 0


@dataclass(frozen=True)
class IngestConfig:
    """DICOM → Parquet ingestion (``blendsign ingest``)."""

    min_age_years: float = 7.0  # paper §Data collection: patients younger than 7 excluded
    require_non_contrast: bool = True  # paper §Data collection: non-contrast head CT only
    max_axial_tilt_deg: float = 30.0  # slice normal within this angle of the z axis counts as axial (gantry tilt)
    compression: str = "zstd"  # Parquet codec for the slice dataset
    compression_level: int = 1  # zstd level: fast writes; HU images compress ~2× at any level
    rows_per_row_group: int = 1  # one slice per row group: the data loader reads single slices
    workers: int = 1


@dataclass(frozen=True)
class LabelConfig:
    """Label fusion (``blendsign fuse``)."""

    box_match_iou: float = 0.5  # readers' boxes on one slice are the same region at IoU ≥ this


@dataclass(frozen=True)
class FoldConfig:
    """Patient-level cross-validation folds (``blendsign folds``)."""

    k: int = 5  # paper §Evaluation protocol: 5-fold cross-validation
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """Top-level configuration: one section per stage."""

    preset: str = "paper"
    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.field": value}``, the form logged as MLflow params."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data)


def _build(cls: Any, data: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown config field(s) for {cls.__name__}: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _build(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def override(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Copy of ``cfg`` with fields of named sections replaced, e.g. ``override(cfg, synth={"size": 64})``."""
    changes: dict[str, Any] = {}
    for section, values in sections.items():
        current = getattr(cfg, section)
        changes[section] = replace(current, **values) if is_dataclass(current) else values
    return replace(cfg, **changes)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's values: every default above.
    "paper": {},
    # Minutes on a 2-core CPU: smaller images and cohort.
    "demo": {"synth": {"scans": 24, "size": 128}},
    # Seconds: the test suite.
    "ci": {"synth": {"scans": 10, "size": 64, "slices_per_scan": (6, 8)}},
}


def load_preset(name: str) -> Config:
    """The ``paper`` defaults with the named preset's overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(override(Config(), **PRESETS[name]), preset=name)
