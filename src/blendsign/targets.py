"""Detection-branch targets and box decoding (paper §Detection branch, after CenterNet and FCOS).

The detection map has 5 channels on the feature grid (``h × w`` cells, ``stride`` input pixels each; cell ``j``
stands for pixels ``[j·stride, (j+1)·stride)`` and is centered on ``(j + 0.5)·stride``):

* channel 0, the center heatmap: 1.0 at the cell holding each box's center, a Gaussian around it (CenterNet's
  "Gaussian rendering"), 0 elsewhere; max-merged where boxes overlap;
* channels 1–4, the distances from a positive cell's center to the box's left, right, top and bottom sides, in
  stride units.

Positive (regression) cells, our choice: FCOS's rule, every cell whose center lies strictly inside a box (the
smallest box wins where boxes overlap), plus each box's center cell, always assigned to its own box (the smallest
one if several boxes share a center cell). The center cell is where :func:`decode_boxes` reads the distances, so
it is always supervised, also for a box smaller than a cell that holds no cell center; distances that would be
negative there (cell center outside such a box) are clamped to 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["decode_boxes", "draw_gaussian", "encode_targets", "gaussian_radius"]


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


def draw_gaussian(heatmap: Tensor, center: tuple[int, int], radius: int) -> Tensor:
    """Max-merge a Gaussian peak into ``heatmap`` in place (CenterNet's ``draw_umich_gaussian``).

    Args:
        heatmap: ``[h, w]``.
        center: ``(x, y)``: column and row of the peak cell; the peak value there is exactly 1.0.
        radius: half-width of the drawn ``(2r+1) × (2r+1)`` window, in cells; ``sigma = (2r+1) / 6`` (the
            diameter / 6, as CenterNet), so a cell at distance ``d`` gets ``exp(−d² / 2σ²)``.

    Returns:
        ``heatmap``.
    """
    radius = max(0, int(radius))
    sigma = (2 * radius + 1) / 6
    x, y = int(center[0]), int(center[1])
    rows, cols = heatmap.shape
    x0, x1 = max(0, x - radius), min(cols, x + radius + 1)
    y0, y1 = max(0, y - radius), min(rows, y + radius + 1)
    if x0 >= x1 or y0 >= y1:
        return heatmap
    dy = torch.arange(y0, y1, device=heatmap.device, dtype=heatmap.dtype) - y  # [y1-y0]
    dx = torch.arange(x0, x1, device=heatmap.device, dtype=heatmap.dtype) - x  # [x1-x0]
    gaussian = torch.exp(-(dy[:, None] ** 2 + dx[None, :] ** 2) / (2 * sigma * sigma))  # [y1-y0, x1-x0]
    window = heatmap[y0:y1, x0:x1]  # a view: writing it writes the heatmap
    window.copy_(torch.maximum(window, gaussian))
    return heatmap


def encode_targets(
    boxes: Tensor,
    *,
    input_size: int,
    stride: int,
    min_overlap: float = 0.7,
    feature_size: int | None = None,
) -> dict[str, Tensor]:
    """Detection targets of one slice (paper §Detection branch).

    Args:
        boxes: ``[K, 4]`` hemorrhage boxes ``(x_min, y_min, x_max, y_max)`` in input pixels (after resizing and
            augmentation); ``K = 0`` for a non-ICH slice. Boxes are clamped to the ``input_size`` square and
            those left with no width or height dropped.
        input_size: side of the (square) model input in pixels.
        stride: input pixels per feature cell (``BlendSignNet.stride``).
        min_overlap: IoU for the Gaussian radius (:func:`gaussian_radius`, computed in cells;
            ``LossConfig.gaussian_min_overlap``).
        feature_size: side ``h`` of the feature grid; default ``ceil(input_size / stride)``, which is
            ``BlendSignNet.feature_size(input_size)`` whenever ``input_size`` is a multiple of the stride.

    Returns:
        ``heatmap`` ``[1, h, h]`` float (1.0 at each box's center cell), ``reg`` ``[4, h, h]`` float (left, right,
        top, bottom distances in stride units at positive cells, 0 elsewhere), ``reg_mask`` ``[h, h]`` bool
        (positive cells; see the module docstring). All zeros / all False when no box is left.
    """
    h = feature_size if feature_size is not None else math.ceil(input_size / stride)
    device = boxes.device
    heatmap = torch.zeros(1, h, h, device=device)
    reg = torch.zeros(4, h, h, device=device)
    reg_mask = torch.zeros(h, h, dtype=torch.bool, device=device)

    boxes = boxes.reshape(-1, 4).float().clamp(0, input_size)  # [K, 4]
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if len(boxes) == 0:
        return {"heatmap": heatmap, "reg": reg, "reg_mask": reg_mask}
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [K]
    boxes = boxes[area.argsort(descending=True)]  # largest first: later (smaller) boxes overwrite

    centers = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride  # [h] cell centers, pixels
    cy, cx = centers[:, None], centers[None, :]  # [h, 1], [1, h]
    for x_min, y_min, x_max, y_max in boxes.tolist():
        # Distances from every cell center to this box's left, right, top and bottom sides, stride units.
        dist = (
            torch.stack(torch.broadcast_tensors(cx - x_min, x_max - cx, cy - y_min, y_max - cy)) / stride
        )  # [4, h, h]
        inside = dist.min(dim=0).values > 0  # [h, h]: cell center strictly inside the box
        reg[:, inside] = dist[:, inside]
        reg_mask |= inside

    for x_min, y_min, x_max, y_max in boxes.tolist():  # center cells last, so they keep their own box
        col = min(max(int((x_min + x_max) / 2 // stride), 0), h - 1)
        row = min(max(int((y_min + y_max) / 2 // stride), 0), h - 1)
        radius = int(gaussian_radius((y_max - y_min) / stride, (x_max - x_min) / stride, min_overlap))
        draw_gaussian(heatmap[0], (col, row), radius)
        px, py = (col + 0.5) * stride, (row + 0.5) * stride
        distances = torch.tensor([px - x_min, x_max - px, py - y_min, y_max - py], device=device) / stride
        reg[:, row, col] = distances.clamp(min=0)
        reg_mask[row, col] = True
    return {"heatmap": heatmap, "reg": reg, "reg_mask": reg_mask}


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
