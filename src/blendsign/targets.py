"""Detection-branch targets and box decoding (paper §Detection branch, after CenterNet and FCOS).

The detection map has 5 channels on the feature grid (``h × w`` cells, ``stride`` input pixels each; cell ``j``
stands for pixels ``[j·stride, (j+1)·stride)`` and is centered on ``(j + 0.5)·stride``):

* channel 0, the center heatmap: 1.0 at the cell holding each box's center, a Gaussian around it (CenterNet's
  "Gaussian rendering"), 0 elsewhere; max-merged where boxes overlap;
* channels 1–4, the distances from a positive cell's center to the box's left, right, top and bottom sides, in
  stride units.

Positive (regression) cells, our choice: FCOS's rule, every cell whose center lies strictly inside a box (the
smallest box wins where boxes overlap), plus each box's center cell, always assigned to its own box (the smallest
one if several boxes share a center cell); of boxes of equal area, the one listed later wins. The center cell is
where :func:`decode_boxes` reads the distances, so it is always supervised, also for a box smaller than a cell that
holds no cell center; distances that would be negative there (cell center outside such a box) are clamped to 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = ["decode_boxes", "encode_targets", "encode_targets_batch", "gaussian_radius"]


def gaussian_radius(h: float, w: float, min_overlap: float = 0.7) -> float:
    """CenterNet's Gaussian radius for an ``h × w`` box (in the units of the grid it is drawn on).

    The largest shift of the box's corners that keeps ``IoU ≥ min_overlap`` with the box, the minimum over
    CornerNet's three cases (both corners inside, both outside, one of each). This is the corrected solution of
    the three quadratics, ``r = (b ∓ √(b² − 4ac)) / 2a``, as in mmdetection's ``gaussian_radius``; CornerNet and
    CenterNet's released code divide by 2 instead of 2a (CornerNet issue #110), which overestimates the radius.
    """
    a1, b1, c1 = 1.0, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - math.sqrt(max(b1 * b1 - 4 * a1 * c1, 0.0))) / (2 * a1)
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 - math.sqrt(max(b2 * b2 - 4 * a2 * c2, 0.0))) / (2 * a2)
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(max(b3 * b3 - 4 * a3 * c3, 0.0))) / (2 * a3)
    return min(r1, r2, r3)


def _div(x: Tensor, divisor: float, rounding_mode: str | None = None) -> Tensor:
    """``x / divisor`` (or ``x // divisor``) rounded as Python's: CUDA multiplies by the reciprocal of a Python
    scalar divisor, so it is a 0-dim tensor on ``x``'s device here (a fill, no host-to-device copy)."""
    return torch.div(x, torch.full((), divisor, dtype=x.dtype, device=x.device), rounding_mode=rounding_mode)


def _gaussian_radius(h: Tensor, w: Tensor, min_overlap: float) -> Tensor:
    """:func:`gaussian_radius` elementwise, the same operations in the same order (float64 ``h``, ``w``: the
    same results as Python's floats)."""
    a1, b1, c1 = 1.0, h + w, _div(w * h * (1 - min_overlap), 1 + min_overlap)
    r1 = _div(b1 - torch.sqrt((b1 * b1 - 4 * a1 * c1).clamp(min=0)), 2 * a1)
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = _div(b2 - torch.sqrt((b2 * b2 - 4 * a2 * c2).clamp(min=0)), 2 * a2)
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = _div(b3 + torch.sqrt((b3 * b3 - 4 * a3 * c3).clamp(min=0)), 2 * a3)
    return torch.minimum(torch.minimum(r1, r2), r3)


def encode_targets_batch(
    boxes: Sequence[Tensor],
    *,
    input_size: int,
    stride: int,
    min_overlap: float = 0.7,
    feature_size: int | None = None,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """Detection targets of a batch of slices (paper §Detection branch), vectorised and free of host syncs.

    The rules of the module docstring, for all slices and boxes at once; ties between boxes of equal area (as
    float32) go to the box listed later in ``boxes[i]``, as in a stable largest-first overwrite.

    Args:
        boxes: ``B`` tensors ``[K_i, 4]``, the hemorrhage boxes ``(x_min, y_min, x_max, y_max)`` of each slice in
            input pixels (after resizing and augmentation); ``K_i = 0`` for a non-ICH slice. Boxes are clamped to
            the ``input_size`` square and those left with no width or height dropped.
        input_size: side of the (square) model input in pixels.
        stride: input pixels per feature cell (``BlendSignNet.stride``).
        min_overlap: IoU for the Gaussian radius (:func:`gaussian_radius`, computed in cells, in float64;
            ``LossConfig.gaussian_min_overlap``).
        feature_size: side ``h`` of the feature grid; default ``ceil(input_size / stride)``, which is
            ``BlendSignNet.feature_size(input_size)`` whenever ``input_size`` is a multiple of the stride.
        device: where the targets are computed; default the device of ``boxes[0]`` (CPU for ``B = 0``).

    Returns:
        ``heatmap`` ``[B, 1, h, h]`` float32 (1.0 at each box's center cell), ``reg`` ``[B, 4, h, h]`` float32
        (left, right, top, bottom distances in stride units at positive cells, 0 elsewhere), ``reg_mask``
        ``[B, h, h]`` bool (positive cells).
    """
    h = feature_size if feature_size is not None else math.ceil(input_size / stride)
    if device is None:
        device = boxes[0].device if boxes else torch.device("cpu")
    per_slice = [b.to(device=device, dtype=torch.float32).reshape(-1, 4) for b in boxes]  # B × [K_i, 4]
    B, K = len(per_slice), max((len(b) for b in per_slice), default=0)
    if K == 0:  # shapes only: no box in the batch
        return {
            "heatmap": torch.zeros(B, 1, h, h, device=device),
            "reg": torch.zeros(B, 4, h, h, device=device),
            "reg_mask": torch.zeros(B, h, h, dtype=torch.bool, device=device),
        }
    # Zero padding is the degenerate box (0, 0, 0, 0), dropped below with the boxes of no width or height.
    padded = pad_sequence(per_slice, batch_first=True).clamp(0, input_size)  # [B, K, 4]
    x_min, y_min, x_max, y_max = padded.unbind(-1)  # [B, K] each
    valid = (x_max > x_min) & (y_max > y_min)  # [B, K]
    area = (x_max - x_min) * (y_max - y_min)  # [B, K]
    # Rank: how many boxes of its slice box k beats (smaller, or equally large and listed later), times K, plus k.
    # Unique per slice and ordered as the boxes' precedence, so the largest rank among the boxes that claim a cell
    # is its winner's, and the rank modulo K the winner.
    index = torch.arange(K, device=device)  # [K]
    beats = (area[:, :, None] < area[:, None, :]) | (
        (area[:, :, None] == area[:, None, :]) & (index[:, None] > index[None, :])
    )  # [B, K, K]: box k beats box k'
    rank = torch.where(valid, (beats & valid[:, None, :]).sum(-1) * K + index, -1)  # [B, K]; −1: no box

    cells = torch.arange(h, device=device)  # [h]
    centers = (cells.float() + 0.5) * stride  # [h] cell centers, pixels
    # Distances from every cell center's column (row) to each box's left, right (top, bottom) side, stride units.
    left = _div(centers - x_min[..., None], stride)  # [B, K, h] over columns
    right = _div(x_max[..., None] - centers, stride)  # [B, K, h] over columns
    top = _div(centers - y_min[..., None], stride)  # [B, K, h] over rows
    bottom = _div(y_max[..., None] - centers, stride)  # [B, K, h] over rows
    inside_x = (left > 0) & (right > 0)  # [B, K, h]
    inside_y = (top > 0) & (bottom > 0)  # [B, K, h]
    inside = valid[..., None, None] & inside_y[..., :, None] & inside_x[..., None, :]  # [B, K, h, h]

    # Center cells, radius and Gaussian width in float64, as Python's arithmetic in the scalar definitions.
    x_min64, y_min64, x_max64, y_max64 = x_min.double(), y_min.double(), x_max.double(), y_max.double()  # [B, K]
    col = _div(_div(x_min64 + x_max64, 2), stride, "floor").clamp(0, h - 1).long()  # [B, K]
    row = _div(_div(y_min64 + y_max64, 2), stride, "floor").clamp(0, h - 1).long()  # [B, K]
    radius = _gaussian_radius(_div(y_max64 - y_min64, stride), _div(x_max64 - x_min64, stride), min_overlap)
    radius = radius.long()  # [B, K], truncated as int()
    sigma = _div((2 * radius + 1).double(), 6)  # [B, K]: the window's side / 6, as CenterNet
    two_sigma2 = (2 * sigma * sigma).float()  # [B, K]

    dy = cells - row[..., None]  # [B, K, h] over rows
    dx = cells - col[..., None]  # [B, K, h] over columns
    in_y, in_x = dy.abs() <= radius[..., None], dx.abs() <= radius[..., None]  # [B, K, h] each
    window = valid[..., None, None] & in_y[..., :, None] & in_x[..., None, :]  # [B, K, h, h]: the (2r+1)² window
    # Squared offsets, 0 outside the window (values dropped there): no exp of large negatives, slow on the CPU.
    dy2, dx2 = torch.where(in_y, dy, 0).float() ** 2, torch.where(in_x, dx, 0).float() ** 2  # [B, K, h] each
    gaussian = torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / two_sigma2[..., None, None])  # [B, K, h, h]
    heatmap = torch.where(window, gaussian, 0).amax(dim=1, keepdim=True)  # [B, 1, h, h]

    inside_rank = torch.where(inside, rank[..., None, None], -1).amax(dim=1)  # [B, h, h]
    center_rank = torch.full((B, h * h), -1, device=device).scatter_reduce(
        1, row * h + col, rank, "amax"
    ).view(B, h, h)  # [B, h, h]
    claimed_center, claimed_inside = center_rank >= 0, inside_rank >= 0  # [B, h, h]
    # [B, h, h]: the box supervising each cell (center cells first); meaningless where unclaimed
    winner = torch.where(claimed_center, center_rank, inside_rank).remainder(K)

    b_ = torch.arange(B, device=device)[:, None, None]  # [B, 1, 1]
    r_, c_ = cells[None, :, None], cells[None, None, :]  # [1, h, 1], [1, 1, h]
    reg_inside = torch.stack(
        [left[b_, winner, c_], right[b_, winner, c_], top[b_, winner, r_], bottom[b_, winner, r_]], dim=1
    )  # [B, 4, h, h]
    # At its center cell a box's distances, from the cell center (in float64 as Python floats), clamped ≥ 0.
    px, py = (col.double() + 0.5) * stride, (row.double() + 0.5) * stride  # [B, K]
    at_center = torch.stack([px - x_min64, x_max64 - px, py - y_min64, y_max64 - py], dim=1).float()  # [B, 4, K]
    at_center = _div(at_center, stride).clamp(min=0)  # [B, 4, K]
    reg_center = at_center.gather(2, winner.reshape(B, 1, h * h).expand(B, 4, h * h)).reshape(B, 4, h, h)
    reg_mask = claimed_center | claimed_inside  # [B, h, h]
    reg = torch.where(claimed_center[:, None], reg_center, torch.where(claimed_inside[:, None], reg_inside, 0))
    return {"heatmap": heatmap, "reg": reg, "reg_mask": reg_mask}


def encode_targets(
    boxes: Tensor,
    *,
    input_size: int,
    stride: int,
    min_overlap: float = 0.7,
    feature_size: int | None = None,
) -> dict[str, Tensor]:
    """Detection targets of one slice (paper §Detection branch): :func:`encode_targets_batch` of a batch of one.

    Args:
        boxes: ``[K, 4]`` hemorrhage boxes ``(x_min, y_min, x_max, y_max)`` in input pixels; ``K = 0`` for a
            non-ICH slice. The other arguments as :func:`encode_targets_batch`'s; computed on ``boxes.device``.

    Returns:
        ``heatmap`` ``[1, h, h]`` float32, ``reg`` ``[4, h, h]`` float32, ``reg_mask`` ``[h, h]`` bool; all zeros /
        all False when no box is left.
    """
    batch = encode_targets_batch(
        [boxes], input_size=input_size, stride=stride, min_overlap=min_overlap, feature_size=feature_size,
        device=boxes.device,
    )
    return {key: value[0] for key, value in batch.items()}


def decode_boxes(det: Tensor, *, stride: int, threshold: float = 0.3, max_boxes: int = 10) -> Tensor:
    """Boxes from one detection map: peaks of the center heatmap and the distances predicted there.

    Args:
        det: ``[5, h, w]`` model output for one slice (channel 0: center logit; 1–4: left, right, top, bottom
            distances in stride units, already non-negative).
        stride: input pixels per feature cell.
        threshold: minimum center probability ``sigmoid(det[0])`` of a peak.
        max_boxes: keep at most this many, highest score first.

    Returns:
        ``[M, 5]``: ``(x_min, y_min, x_max, y_max, score)`` in input pixels, clipped to the grid's extent
        (``w·stride × h·stride``), sorted by descending score; ``M ≤ max_boxes``.
    """
    det = det.detach().float()
    heat = det[0].sigmoid()  # [h, w]
    rows, cols = heat.shape
    pooled = F.max_pool2d(heat[None, None], kernel_size=3, stride=1, padding=1)[0, 0]  # [h, w]
    peaks = (heat == pooled) & (heat >= threshold)  # [h, w]: local maxima (CenterNet's 3×3 max-pool "NMS")
    row, col = peaks.nonzero(as_tuple=True)  # [P], [P]
    scores = heat[row, col]  # [P]
    order = scores.argsort(descending=True)[:max_boxes]
    row, col, scores = row[order], col[order], scores[order]  # [M]
    dist = det[1:, row, col] * stride  # [4, M] pixels
    px, py = (col.float() + 0.5) * stride, (row.float() + 0.5) * stride  # [M]
    boxes = torch.stack(
        [
            (px - dist[0]).clamp(0, cols * stride),
            (py - dist[2]).clamp(0, rows * stride),
            (px + dist[1]).clamp(0, cols * stride),
            (py + dist[3]).clamp(0, rows * stride),
            scores,
        ],
        dim=1,
    )  # [M, 5]
    return boxes
