"""The one preprocessing definition: HU → three CT windows → resize; and the paper's augmentations.

Training, evaluation and serving all call ``preprocess``; only training adds ``Augment``.
Paper §Data pre-processing and augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from blendsign.config import DataConfig


def window(hu: Tensor, windows: Sequence[tuple[float, float]]) -> Tensor:
    """Encode HU as one channel per window: ``clip((HU − (WL − WW/2)) / WW, 0, 1)``.

    Args:
        hu: ``[H, W]`` Hounsfield units (any numeric dtype).
        windows: ``(WL, WW)`` per output channel; the paper's are tissue 40/40 → R, brain 50/100 → G,
            blood 60/40 → B.

    Returns:
        ``[C, H, W]`` float32 in [0, 1].
    """
    wl = torch.tensor([w[0] for w in windows], dtype=torch.float32, device=hu.device).view(-1, 1, 1)
    ww = torch.tensor([w[1] for w in windows], dtype=torch.float32, device=hu.device).view(-1, 1, 1)
    return ((hu.to(torch.float32)[None] - (wl - ww / 2)) / ww).clamp_(0.0, 1.0)


def preprocess(hu: Tensor, cfg: DataConfig) -> Tensor:
    """One slice in HU ``[H, W]`` → model input ``[3, size, size]`` in [0, 1] (windows, then resize)."""
    x = window(hu, cfg.windows)  # [3, H, W]
    if x.shape[-2:] != (cfg.size, cfg.size):
        x = F.interpolate(x[None], size=(cfg.size, cfg.size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x


def scale_boxes(boxes: Tensor, rows: int, cols: int, size: int) -> Tensor:
    """Boxes ``[K, 4]`` (x_min, y_min, x_max, y_max) in native pixels → pixels of the ``size``² input."""
    scale = torch.tensor([size / cols, size / rows, size / cols, size / rows], dtype=torch.float32)
    return boxes.to(torch.float32) * scale


class Augment:
    """Random LR flip, LR/UD shift, rotation and scaling, drawn per slice, applied to image and boxes together.

    Paper §Data augmentation (Figure 3). Boxes leaving the image are clipped; boxes clipped to less than a
    pixel are dropped.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.transform = v2.Compose(
            [
                v2.RandomHorizontalFlip(p=cfg.hflip_p),
                v2.RandomAffine(
                    degrees=cfg.max_rotation_deg,
                    translate=(cfg.max_shift, cfg.max_shift),
                    scale=cfg.scale_range,
                    interpolation=v2.InterpolationMode.BILINEAR,
                ),
                v2.ClampBoundingBoxes(),
            ]
        )

    def __call__(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """``image [3, S, S]``, ``boxes [K, 4]`` xyxy → the same, transformed."""
        size = tuple(image.shape[-2:])
        img, bb = self.transform(
            tv_tensors.Image(image),
            tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format="XYXY", canvas_size=size),  # type: ignore[arg-type]
        )
        bb = bb.as_subclass(Tensor)
        keep = ((bb[:, 2] - bb[:, 0]) >= 1) & ((bb[:, 3] - bb[:, 1]) >= 1)
        return img.as_subclass(Tensor), bb[keep]
