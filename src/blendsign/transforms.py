"""The one preprocessing definition: HU → (the head's square) → three CT windows → resize; the augmentations.

Training, evaluation and serving all call ``preprocess``; only training adds ``Augment``.
Paper §Data pre-processing and augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


Crop = tuple[int, int, int]  # (top, left, side) of a square in native pixels


def head_crop(hu: Tensor, cfg: DataConfig) -> Crop | None:
    """The square around the head when ``cfg.crop_head`` is on, else None (the whole slice is resized).

    The bounding box of the largest connected region above ``cfg.crop_threshold_hu`` (skin, bone, brain and
    blood; not air; the table and loose parts of a headrest are other regions), grown into a square about its
    centre with ``cfg.crop_margin`` of its side on each side; None when no pixel is above the threshold. The
    square may reach beyond the slice: :func:`preprocess` pads it with air.
    """
    if not cfg.crop_head:
        return None
    from scipy import ndimage

    labels, n = ndimage.label((hu > cfg.crop_threshold_hu).cpu().numpy())  # [H, W], 4-connected
    if n == 0:
        return None
    head = labels == int(np.bincount(labels.ravel())[1:].argmax()) + 1  # the largest region
    rows, cols = np.nonzero(head.any(axis=1))[0], np.nonzero(head.any(axis=0))[0]
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left)
    side = max(1, round(side * (1 + 2 * cfg.crop_margin)))
    return (top + bottom - side) // 2, (left + right - side) // 2, side


def crop_overlap(crop: Crop, rows: int, cols: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where the ``crop`` square and a ``rows × cols`` slice overlap: ``(in the slice, in the square)`` as index
    pairs (the square may reach beyond the slice)."""
    top, left, side = crop
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, rows), min(left + side, cols)
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))


def preprocess(hu: Tensor, cfg: DataConfig, crop: Crop | None = None) -> Tensor:
    """One slice in HU ``[H, W]`` → model input ``[3, size, size]`` in [0, 1]: the head's square
    (:func:`head_crop`, when on), then the windows, then the resize. ``crop``: that square, if already known."""
    crop = crop if crop is not None else head_crop(hu, cfg)
    if crop is not None:
        side = crop[2]
        canvas = torch.full((side, side), -1024, dtype=hu.dtype, device=hu.device)  # air beyond the slice
        in_slice, in_square = crop_overlap(crop, *hu.shape)
        canvas[in_square] = hu[in_slice]
        hu = canvas
    x = window(hu, cfg.windows)  # [3, H, W]
    if x.shape[-2:] != (cfg.size, cfg.size):
        x = F.interpolate(x[None], size=(cfg.size, cfg.size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x


def scale_boxes(boxes: Tensor, rows: int, cols: int, size: int, crop: Crop | None = None) -> Tensor:
    """Boxes ``[K, 4]`` (x_min, y_min, x_max, y_max) in native pixels → pixels of the ``size``² input (of the
    ``crop`` square when given)."""
    if crop is None:
        scale = torch.tensor([size / cols, size / rows, size / cols, size / rows], dtype=torch.float32)
        return boxes.to(torch.float32) * scale
    top, left, side = crop
    offset = torch.tensor([left, top, left, top], dtype=torch.float32)
    return (boxes.to(torch.float32) - offset) * (size / side)


def unscale_boxes(boxes: Tensor, rows: int, cols: int, size: int, crop: Crop | None = None) -> Tensor:
    """The inverse of :func:`scale_boxes`: boxes ``[K, 4+]`` in input pixels → native pixels (extra columns,
    such as a score, are kept)."""
    out = boxes.to(torch.float32).clone()
    if crop is None:
        out[:, 0:4:2] *= cols / size
        out[:, 1:4:2] *= rows / size
        return out
    top, left, side = crop
    out[:, :4] = out[:, :4] * (side / size) + torch.tensor([left, top, left, top], dtype=torch.float32)
    return out


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
            tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format="XYXY", canvas_size=size),
        )
        bb = bb.as_subclass(Tensor)
        keep = ((bb[:, 2] - bb[:, 0]) >= 1) & ((bb[:, 3] - bb[:, 1]) >= 1)
        return img.as_subclass(Tensor), bb[keep]
