"""The one preprocessing definition: HU → (the head's square) → three CT windows → resize; the augmentations.

Training, evaluation and serving all call ``preprocess``; only training adds the augmentations, batched:
``draw_affine`` (per slice, in the loader worker) → ``augment_images`` (one ``grid_sample`` per batch, on the
training device) and ``augment_boxes`` (on the CPU). Paper §Data pre-processing and augmentation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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
    low, ww = _window_bounds(tuple((float(wl), float(ww)) for wl, ww in windows), hu.device)
    return ((hu.to(torch.float32)[None] - low) / ww).clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=16)
def _window_bounds(windows: tuple[tuple[float, float], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(WL − WW/2, WW)`` as ``[C, 1, 1]`` float32 on ``device``, made once (a host→GPU copy per slice would
    make the host wait for the device)."""
    wl = torch.tensor([w[0] for w in windows], dtype=torch.float32, device=device).view(-1, 1, 1)
    ww = torch.tensor([w[1] for w in windows], dtype=torch.float32, device=device).view(-1, 1, 1)
    return wl - ww / 2, ww


Crop = tuple[int, int, int]  # (top, left, side) of a square in native pixels
AIR_HU = -1024  # what fills the square beyond the slice (and pads a batch's smaller slices, data.collate)


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
        canvas = torch.full((side, side), AIR_HU, dtype=hu.dtype, device=hu.device)  # air beyond the slice
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


AFFINE_PARAMS = ("flip", "angle", "tx", "ty", "scale")  # the columns of an augmentation's parameters
IDENTITY = (0.0, 0.0, 0.0, 0.0, 1.0)  # no flip, 0°, no shift, scale 1


def draw_affine(cfg: DataConfig, size: int, generator: torch.Generator) -> Tensor:
    """One slice's augmentation (paper §Data augmentation) as ``[5]`` float32 :data:`AFFINE_PARAMS`, from
    ``generator`` only, with torchvision's ``RandomHorizontalFlip`` + ``RandomAffine`` distributions and in their
    draw order: flip (1 with probability ``cfg.hflip_p``), angle ~ U(±max_rotation_deg), tx then ty =
    round(U(±max_shift·size)) whole pixels, scale ~ U(scale_range).
    """
    flip = float(torch.rand(1, generator=generator).item() < cfg.hflip_p)
    angle = torch.empty(1).uniform_(-cfg.max_rotation_deg, cfg.max_rotation_deg, generator=generator).item()
    max_d = float(cfg.max_shift * size)
    tx = round(torch.empty(1).uniform_(-max_d, max_d, generator=generator).item())
    ty = round(torch.empty(1).uniform_(-max_d, max_d, generator=generator).item())
    scale = torch.empty(1).uniform_(cfg.scale_range[0], cfg.scale_range[1], generator=generator).item()
    return torch.tensor([flip, angle, tx, ty, scale], dtype=torch.float32)


def affine_matrices(params: Tensor, size: int) -> Tensor:
    """:data:`AFFINE_PARAMS` ``[B, 5]`` → forward maps ``[B, 2, 3]`` of a ``size``² image (paper §Data augmentation).

    Input-pixel coordinates as torchvision's boxes: x right, y down, the image spans [0, size], pixel (i, j)
    is centred at (j + 0.5, i + 0.5). The map is torchvision's flip-then-affine composite: the LR flip x → size − x,
    then about the centre c = (size/2, size/2) p → c + t + scale·R(angle)·(p − c), R = [[cos, −sin], [sin, cos]]
    (torchvision's sign: positive angles turn clockwise on screen, y pointing down).
    """
    flip, angle, tx, ty, scale = params.unbind(-1)  # [B] each
    rad = torch.deg2rad(angle)
    cos, sin, f = scale * rad.cos(), scale * rad.sin(), 1 - 2 * flip  # f: −1 flips x about the centre
    c = size / 2
    linear = torch.stack([cos * f, -sin, sin * f, cos], -1).view(-1, 2, 2)  # [B, 2, 2]: scale·R·diag(f, 1)
    offset = c + torch.stack([tx, ty], -1) - linear.sum(-1) * c  # [B, 2]: c + t − linear·c
    return torch.cat([linear, offset[..., None]], -1)  # [B, 2, 3]


def augment_images(images: Tensor, params: Tensor) -> Tensor:
    """Images ``[B, C, S, S]`` (float, any device) → the same, each warped by its row of ``params`` ``[B, 5]``
    (paper §Data augmentation): one ``affine_grid`` and one bilinear ``grid_sample`` for the batch, zeros outside
    the image, no host sync. Equal to torchvision's ``affine`` without ``fill`` (with ``fill=0`` torchvision also
    multiplies the 1-px ring at the canvas edge by the resampled coverage, pytorch/vision#6517).
    """
    B, C, S, W = images.shape
    if S != W:
        raise ValueError(f"augment_images needs square images, got {S}×{W}")
    m = affine_matrices(params.to(images.device, torch.float32), S)  # [B, 2, 3] forward, pixels
    # The same map in grid_sample's coordinates u = p / h − 1, h = S/2: u → linear·u + (offset + linear·1·h) / h − 1.
    linear = m[..., :2]  # [B, 2, 2]
    offset = (m[..., 2] + linear.sum(-1) * (S / 2)) / (S / 2) - 1  # [B, 2]
    a, b, c, d = linear.flatten(1).unbind(-1)  # [B] each: linear = [[a, b], [c, d]]
    inv = torch.stack([d, -b, -c, a], -1).view(-1, 2, 2) / (a * d - b * c)[:, None, None]  # [B, 2, 2]
    theta = torch.cat([inv, -(inv @ offset[..., None])], -1)  # [B, 2, 3]: output → input sampling points
    grid = F.affine_grid(theta.to(images.dtype), [B, C, S, S], align_corners=False)  # [B, S, S, 2]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_boxes(boxes: Sequence[Tensor], params: Tensor, size: int) -> list[Tensor]:
    """Per slice boxes ``[K_i, 4]`` xyxy in input pixels → the enclosing boxes of their four corners under each
    slice's forward map (``params`` ``[B, 5]``, on the CPU), clamped to [0, size]; boxes then under a pixel wide
    or high are dropped (paper §Data augmentation). Float32, on the CPU.
    """
    per_slice = [b.reshape(-1, 4).to("cpu", torch.float32) for b in boxes]  # [K_i, 4] each
    counts = [len(b) for b in per_slice]
    xyxy = torch.cat(per_slice)  # [N, 4]
    m = affine_matrices(params.cpu(), size).repeat_interleave(torch.tensor(counts), 0)  # [N, 2, 3]
    corners = xyxy[:, [[0, 1], [2, 1], [2, 3], [0, 3]]]  # [N, 4, 2]
    moved = corners @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]  # [N, 4, 2]
    out = torch.cat([moved.amin(1), moved.amax(1)], -1).clamp_(0, size)  # [N, 4]
    keep = ((out[:, 2] - out[:, 0]) >= 1) & ((out[:, 3] - out[:, 1]) >= 1)  # [N]
    return [b[k] for b, k in zip(out.split(counts), keep.split(counts), strict=True)]
