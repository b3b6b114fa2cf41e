"""Detection targets: Gaussian radius and rendering, distance encoding, decoding (blendsign.targets)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from blendsign.targets import decode_boxes, encode_targets, encode_targets_batch, gaussian_radius


def draw_gaussian(heatmap: torch.Tensor, center: tuple[int, int], radius: int) -> torch.Tensor:
    """The reference's Gaussian: max-merge a CenterNet ``draw_umich_gaussian`` peak into ``heatmap`` [h, w] in place.

    ``center`` is ``(x, y)``, column and row of the peak cell (exactly 1.0); the ``(2r+1) × (2r+1)`` window has
    ``sigma = (2r+1) / 6``, so a cell at distance ``d`` gets ``exp(−d² / 2σ²)``.
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


def _reference_encode(
    boxes: torch.Tensor, *, input_size: int, stride: int, min_overlap: float = 0.7, feature_size: int | None = None
) -> dict[str, torch.Tensor]:
    """The loop implementation encode_targets had before encode_targets_batch, one slice, box by box.

    One change: a stable sort, so that of boxes of equal area the one listed later wins (it overwrites last).
    """
    h = feature_size if feature_size is not None else math.ceil(input_size / stride)
    heatmap = torch.zeros(1, h, h)
    reg = torch.zeros(4, h, h)
    reg_mask = torch.zeros(h, h, dtype=torch.bool)

    boxes = boxes.reshape(-1, 4).float().clamp(0, input_size)  # [K, 4]
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if len(boxes) == 0:
        return {"heatmap": heatmap, "reg": reg, "reg_mask": reg_mask}
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [K]
    boxes = boxes[area.argsort(descending=True, stable=True)]  # largest first: later (smaller) boxes overwrite

    centers = (torch.arange(h, dtype=torch.float32) + 0.5) * stride  # [h] cell centers, pixels
    cy, cx = centers[:, None], centers[None, :]  # [h, 1], [1, h]
    for x_min, y_min, x_max, y_max in boxes.tolist():
        dist = (
            torch.stack(torch.broadcast_tensors(cx - x_min, x_max - cx, cy - y_min, y_max - cy)) / stride
        )  # [4, h, h]
        inside = dist.min(dim=0).values > 0  # [h, h]
        reg[:, inside] = dist[:, inside]
        reg_mask |= inside

    for x_min, y_min, x_max, y_max in boxes.tolist():  # center cells last, so they keep their own box
        col = min(max(int((x_min + x_max) / 2 // stride), 0), h - 1)
        row = min(max(int((y_min + y_max) / 2 // stride), 0), h - 1)
        radius = int(gaussian_radius((y_max - y_min) / stride, (x_max - x_min) / stride, min_overlap))
        draw_gaussian(heatmap[0], (col, row), radius)
        px, py = (col + 0.5) * stride, (row + 0.5) * stride
        distances = torch.tensor([px - x_min, x_max - px, py - y_min, y_max - py]) / stride
        reg[:, row, col] = distances.clamp(min=0)
        reg_mask[row, col] = True
    return {"heatmap": heatmap, "reg": reg, "reg_mask": reg_mask}


def test_gaussian_radius_hand_computed() -> None:
    # A 20×20 box at IoU 0.7: the three CornerNet cases give
    #   r1 = (40 − √(40² − 4·400·0.3/1.7)) / 2       = 1.850
    #   r2 = (80 − √(80² − 16·0.3·400)) / 8 = 20·(4 − √11.2)/8 = 1.633   ← the minimum
    #   r3 = (−28 + √(28² + 4·2.8·0.3·400)) / 5.6    = 3.238
    r = gaussian_radius(20, 20, 0.7)
    assert r == pytest.approx(20 * (4 - math.sqrt(11.2)) / 8, rel=1e-9)
    assert r == pytest.approx(1.6334, abs=1e-4)
    # Case 2 (both corners moved inward by r) keeps exactly IoU = min_overlap.
    assert (20 - 2 * r) ** 2 / 400 == pytest.approx(0.7)
    # The uncorrected CenterNet code ((b + √…)/2) would give ≈ 38 cells here.
    assert r < 2


def test_gaussian_radius_scales_with_box_and_overlap() -> None:
    assert gaussian_radius(40, 40) == pytest.approx(2 * gaussian_radius(20, 20))
    assert gaussian_radius(20, 20, 0.5) > gaussian_radius(20, 20, 0.7)
    assert gaussian_radius(4, 4) < 1  # a 128-px box on the stride-32 grid: a single-cell peak


def test_draw_gaussian_values() -> None:
    heat = torch.zeros(7, 7)
    draw_gaussian(heat, (3, 2), radius=2)  # x = 3, y = 2; sigma = (2·2 + 1)/6 = 5/6
    two_sigma2 = 2 * (5 / 6) ** 2  # = 50/36
    assert heat[2, 3] == 1.0
    assert heat[2, 4].item() == pytest.approx(math.exp(-1 / two_sigma2))  # one cell away: e^−0.72 = 0.487
    assert heat[3, 4].item() == pytest.approx(math.exp(-2 / two_sigma2))  # diagonal neighbour
    assert heat[4, 5].item() == pytest.approx(math.exp(-8 / two_sigma2))  # window corner
    assert heat[2, 6] == 0 and heat[5, 3] == 0  # outside the (2r+1)² window
    assert (heat > 0).sum() == 25


def test_draw_gaussian_max_merge_and_border() -> None:
    heat = torch.zeros(5, 5)
    heat[0, 1] = 0.9
    draw_gaussian(heat, (0, 0), radius=1)  # sigma = 0.5: neighbours get e^−2
    assert heat[0, 0] == 1.0
    assert heat[0, 1].item() == pytest.approx(0.9)  # the larger value is kept
    assert heat[1, 0].item() == pytest.approx(math.exp(-2))
    assert (heat > 0).sum() == 4  # clipped at the border
    draw_gaussian(heat, (4, 4), radius=0)
    assert heat[4, 4] == 1.0 and heat[3, 4] == 0


def test_encode_hand_placed_box_stride_32() -> None:
    # 128-px input, stride 32 → a 4×4 grid with cell centers at 16, 48, 80, 112 px.
    t = encode_targets(torch.tensor([[10.0, 40.0, 70.0, 120.0]]), input_size=128, stride=32, min_overlap=0.7)
    assert t["heatmap"].shape == (1, 4, 4) and t["reg"].shape == (4, 4, 4) and t["reg_mask"].shape == (4, 4)
    # Box center (40, 80) → column 1, row 2; radius int(0.3…) = 0: a single peak.
    expected_heat = torch.zeros(4, 4)
    expected_heat[2, 1] = 1.0
    assert torch.equal(t["heatmap"][0], expected_heat)
    # Cell centers inside the box: columns 0, 1 (x = 16, 48) × rows 1–3 (y = 48, 80, 112).
    expected_mask = torch.zeros(4, 4, dtype=torch.bool)
    expected_mask[1:, :2] = True
    assert torch.equal(t["reg_mask"], expected_mask)
    # Row 1, column 0, center (16, 48): left (16−10)/32, right (70−16)/32, top (48−40)/32, bottom (120−48)/32.
    assert t["reg"][:, 1, 0].tolist() == pytest.approx([0.1875, 1.6875, 0.25, 2.25])
    # The center cell (48, 80): 38/32, 22/32, 40/32, 40/32.
    assert t["reg"][:, 2, 1].tolist() == pytest.approx([1.1875, 0.6875, 1.25, 1.25])
    assert torch.all(t["reg"][:, ~expected_mask] == 0)


def test_encode_gaussian_on_fine_grid() -> None:
    # Stride 4: a 64×80-px box is 16×20 cells → radius int(1.45) = 1, sigma = 0.5.
    t = encode_targets(torch.tensor([[16.0, 16.0, 80.0, 96.0]]), input_size=128, stride=4, min_overlap=0.7)
    heat = t["heatmap"][0]
    assert heat.shape == (32, 32)
    assert heat[14, 12] == 1.0  # center (48, 56) px → column 12, row 14
    assert heat[14, 13].item() == pytest.approx(math.exp(-2))  # exp(−1 / 2σ²)
    assert heat[15, 13].item() == pytest.approx(math.exp(-4))
    assert heat[14, 14] == 0
    assert (heat == 1).sum() == 1
    # Positives: cell centers 4j+2 strictly inside: 16 columns × 20 rows.
    assert t["reg_mask"].sum() == 16 * 20
    # Center cell (50, 58) px: (50−16)/4, (80−50)/4, (58−16)/4, (96−58)/4.
    assert t["reg"][:, 14, 12].tolist() == pytest.approx([8.5, 7.5, 10.5, 9.5])


@pytest.mark.parametrize(
    "boxes",
    [
        torch.zeros(0, 4),
        torch.tensor([[30.0, 30.0, 30.0, 50.0]]),  # zero width
        torch.tensor([[70.0, 10.0, 90.0, 20.0]]),  # entirely right of a 64-px image
    ],
)
def test_encode_empty_and_degenerate(boxes: torch.Tensor) -> None:
    t = encode_targets(boxes, input_size=64, stride=16, min_overlap=0.7)
    assert t["heatmap"].shape == (1, 4, 4) and t["reg"].shape == (4, 4, 4)
    assert t["heatmap"].sum() == 0 and t["reg"].sum() == 0
    assert t["reg_mask"].dtype == torch.bool and not t["reg_mask"].any()


def test_encode_boxes_touching_and_crossing_the_border() -> None:
    # Clamped to (0, 0, 30, 20): center (15, 10) → cell (0, 0), whose center (8, 8) is inside.
    t = encode_targets(torch.tensor([[-10.0, -5.0, 30.0, 20.0]]), input_size=64, stride=16, min_overlap=0.7)
    assert t["heatmap"][0, 0, 0] == 1.0
    assert t["reg"][:, 0, 0].tolist() == pytest.approx([0.5, 22 / 16, 0.5, 12 / 16])
    # Touching the bottom-right corner, and crossing it (clamped to (50, 50, 64, 64)).
    for box in ([40.0, 40.0, 64.0, 64.0], [50.0, 50.0, 90.0, 90.0]):
        t = encode_targets(torch.tensor([box]), input_size=64, stride=16, min_overlap=0.7)
        assert t["heatmap"][0, 3, 3] == 1.0 and t["reg_mask"][3, 3]
        assert t["reg"][:, 3, 3].tolist() == pytest.approx([(56 - box[0]) / 16, 0.5, (56 - box[1]) / 16, 0.5])


def test_encode_overlap_smallest_wins_but_center_cells_keep_their_box() -> None:
    big, small = [0.0, 0.0, 128.0, 128.0], [64.0, 64.0, 128.0, 128.0]
    t = encode_targets(torch.tensor([small, big]), input_size=128, stride=32, min_overlap=0.7)
    assert t["heatmap"][0, 2, 2] == 1.0 and t["heatmap"][0, 3, 3] == 1.0
    # Cell (row 2, col 3), center (112, 80): inside both → the small box: 48/32, 16/32, 16/32, 48/32.
    assert t["reg"][:, 2, 3].tolist() == pytest.approx([1.5, 0.5, 0.5, 1.5])
    # Cell (2, 2), center (80, 80), is inside the small box but is the big box's center cell: 80/32, 48/32, ...
    assert t["reg"][:, 2, 2].tolist() == pytest.approx([2.5, 1.5, 2.5, 1.5])
    assert t["reg_mask"].all()


def test_encode_box_smaller_than_a_cell() -> None:
    # No cell center inside (2, 2, 10, 10); its center cell (0, 0), centered (16, 16), is still positive,
    # with the negative right/bottom distances clamped to 0.
    t = encode_targets(torch.tensor([[2.0, 2.0, 10.0, 10.0]]), input_size=64, stride=32, min_overlap=0.7)
    assert t["reg_mask"].sum() == 1 and t["reg_mask"][0, 0]
    assert t["reg"][:, 0, 0].tolist() == pytest.approx([14 / 32, 0.0, 14 / 32, 0.0])


def _det_from_targets(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """A perfect detection map [5, h, w]: the heatmap as logits and the target distances."""
    logits = torch.logit(t["heatmap"].clamp(1e-4, 1 - 1e-4))  # [1, h, w]
    return torch.cat([logits, t["reg"]])  # [5, h, w]


@pytest.mark.parametrize("stride", [16, 32])
def test_decode_of_encode_recovers_boxes(stride: int) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        xy = torch.rand(2, generator=g) * 400
        wh = 8 + torch.rand(2, generator=g) * 100
        box = torch.cat([xy, (xy + wh).clamp(max=512)])[None]  # [1, 4]
        t = encode_targets(box, input_size=512, stride=stride, min_overlap=0.7)
        found = decode_boxes(_det_from_targets(t), stride=stride)
        assert found.shape == (1, 5)
        assert found[0, 4].item() == pytest.approx(1 - 1e-4)
        assert torch.all((found[0, :4] - box[0]).abs() <= stride), (box, found)


def test_decode_two_boxes_exactly_sorted_by_score() -> None:
    boxes = torch.tensor([[40.0, 40.0, 200.0, 160.0], [300.0, 320.0, 420.0, 480.0]])
    t = encode_targets(boxes, input_size=512, stride=32, min_overlap=0.7)
    det = _det_from_targets(t)
    det[0, 12, 11] = 3.0  # the second box's center cell (360, 400) → lower score than the first's
    found = decode_boxes(det, stride=32)
    assert found.shape == (2, 5)
    assert torch.allclose(found[:, :4], boxes)  # both boxes hold their center cell's center: exact
    assert found[0, 4] > found[1, 4]


def test_decode_threshold_and_max_boxes() -> None:
    det = torch.full((5, 8, 8), -10.0)
    det[1:] = 1.0
    assert decode_boxes(det, stride=32).shape == (0, 5)
    det[0, ::2, ::2] = 2.0  # 16 isolated peaks, p = 0.88
    assert decode_boxes(det, stride=32, threshold=0.9).shape == (0, 5)
    assert decode_boxes(det, stride=32).shape == (10, 5)
    found = decode_boxes(det, stride=32, max_boxes=20)
    assert found.shape == (16, 5)
    assert found[:, :4].min() >= 0 and found[:, :4].max() <= 256  # clipped to the grid's extent
    # Peak (0, 0) is centered on (16, 16) with 32-px distances: (−16, −16, 48, 48) clipped to (0, 0, 48, 48).
    assert found[:, :4].tolist().count([0.0, 0.0, 48.0, 48.0]) == 1


# encode_targets_batch against the reference loop, on seeded random batches.

_GRIDS = [  # (input_size, stride, feature_size)
    (512, 32, None),
    (128, 32, None),
    (100, 32, None),  # not a multiple of the stride: h = 4, the last cell partly outside the input
    (200, 16, None),
    (64, 4, None),  # a fine grid: radii up to 3
    (96, 8, None),
    (120, 24, None),  # a stride that is no power of two: divisions that round
    (128, 32, 3),  # a grid smaller than the input: center cells clamped to h − 1
    (128, 16, 10),  # and larger
]


def _random_boxes(rng: random.Random, size: int, stride: int, k: int) -> torch.Tensor:
    """``[k, 4]`` boxes of the kinds that exercise the assignment rules, each maybe related to an earlier one."""
    boxes: list[list[float]] = []
    for _ in range(k):
        kind = rng.randrange(10) if boxes else 0  # kinds 8, 9: more of kind 0
        if kind in (1, 2, 3):
            j = rng.randrange(len(boxes))
            x0, y0, x1, y1 = boxes[j]
            w, h = x1 - x0, y1 - y0
        if kind in (0, 8, 9):  # anywhere, from a fraction of a cell to the whole input (Gaussians of radius ≥ 1), maybe
            # partly outside
            w, h = size * rng.uniform(0.01, 1), size * rng.uniform(0.01, 1)
            x0, y0 = rng.uniform(-0.25, 0.9) * size, rng.uniform(-0.25, 0.9) * size
            box = [x0, y0, x0 + w, y0 + h]
        elif kind == 1:  # nested in an earlier box
            a, b = sorted(rng.uniform(0, 1) for _ in range(2))
            c, d = sorted(rng.uniform(0, 1) for _ in range(2))
            box = [x0 + a * w, y0 + c * h, x0 + b * w, y0 + d * h]
        elif kind == 2:  # the same center as an earlier box, so the same center cell, another size
            sx, sy = rng.uniform(0.2, 2.0), rng.uniform(0.2, 2.0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            box = [cx - sx * w / 2, cy - sy * h / 2, cx + sx * w / 2, cy + sy * h / 2]
        elif kind == 3:  # the same area as an earlier box (integer sides: an exact tie), transposed or moved
            x0, y0, w, h = round(x0), round(y0), max(1, round(w)), max(1, round(h))
            boxes[j] = [x0, y0, x0 + w, y0 + h]
            if rng.random() < 0.5:
                w, h = h, w
            dx, dy = rng.randint(-stride, stride), rng.randint(-stride, stride)
            box = [x0 + dx, y0 + dy, x0 + dx + w, y0 + dy + h]
        elif kind == 4:  # smaller than a cell
            x0, y0 = rng.uniform(0, size), rng.uniform(0, size)
            box = [x0, y0, x0 + rng.uniform(0.1, stride), y0 + rng.uniform(0.1, stride)]
        elif kind == 5:  # no width or no height
            x0, y0 = rng.uniform(0, size), rng.uniform(0, size)
            side = rng.uniform(1, size / 2)
            box = [x0, y0, x0, y0 + side] if rng.random() < 0.5 else [x0, y0, x0 + side, y0]
        elif kind == 6:  # on the half-cell lattice: cell centers on the box's sides, centers on cell borders
            x0, y0 = (rng.randrange(-2, 2 * size // stride + 2) * stride / 2 for _ in range(2))
            box = [x0, y0, x0 + rng.randint(1, 6) * stride / 2, y0 + rng.randint(1, 6) * stride / 2]
        else:  # entirely outside the input
            x0 = rng.choice([-size / 2, size + 1.0])
            box = [x0, 10.0, x0 + size / 4, 40.0]
        boxes.append(box)
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _assert_matches_reference(
    batch: dict[str, torch.Tensor], boxes: list[torch.Tensor], heat_atol: float = 0.0, **kwargs: Any
) -> None:
    for i, b in enumerate(boxes):
        ref = _reference_encode(b, **kwargs)
        assert torch.equal(batch["reg_mask"][i].cpu(), ref["reg_mask"]), (i, b)
        assert torch.equal(batch["reg"][i].cpu(), ref["reg"]), (i, b)
        if heat_atol:
            assert torch.allclose(batch["heatmap"][i].cpu(), ref["heatmap"], rtol=0, atol=heat_atol), (i, b)
        else:
            assert torch.equal(batch["heatmap"][i].cpu(), ref["heatmap"]), (i, b)


@pytest.mark.parametrize(("size", "stride", "feature_size"), _GRIDS)
def test_encode_batch_matches_reference(size: int, stride: int, feature_size: int | None) -> None:
    rng = random.Random(f"{size}-{stride}-{feature_size}")
    for _ in range(12):  # 12 batches of 1–8 slices mixing K = 0–5 per grid: ≈ 500 slices in all
        boxes = [_random_boxes(rng, size, stride, rng.randint(0, 5)) for _ in range(rng.randint(1, 8))]
        kwargs: dict[str, Any] = dict(
            input_size=size, stride=stride, min_overlap=rng.choice([0.7, 0.5, 0.3]), feature_size=feature_size
        )
        batch = encode_targets_batch(boxes, **kwargs)
        h = feature_size or math.ceil(size / stride)
        assert batch["heatmap"].shape == (len(boxes), 1, h, h) and batch["heatmap"].dtype == torch.float32
        assert batch["reg"].shape == (len(boxes), 4, h, h) and batch["reg"].dtype == torch.float32
        assert batch["reg_mask"].shape == (len(boxes), h, h) and batch["reg_mask"].dtype == torch.bool
        _assert_matches_reference(batch, boxes, **kwargs)


@pytest.mark.parametrize(("size", "stride", "feature_size"), _GRIDS)
def test_encode_single_slice_matches_reference(size: int, stride: int, feature_size: int | None) -> None:
    rng = random.Random(f"single-{size}-{stride}-{feature_size}")
    for _ in range(30):  # ≈ 270 slices in all
        boxes = _random_boxes(rng, size, stride, rng.randint(0, 5))
        t = encode_targets(boxes, input_size=size, stride=stride, feature_size=feature_size)
        ref = _reference_encode(boxes, input_size=size, stride=stride, feature_size=feature_size)
        assert t.keys() == ref.keys()
        for key in ref:
            assert t[key].shape == ref[key].shape and torch.equal(t[key], ref[key]), (key, boxes)


def test_encode_batch_all_empty_and_no_slices() -> None:
    t = encode_targets_batch([torch.zeros(0, 4), torch.zeros(0, 4)], input_size=64, stride=16)
    assert t["heatmap"].shape == (2, 1, 4, 4) and t["reg"].shape == (2, 4, 4, 4) and t["reg_mask"].shape == (2, 4, 4)
    assert t["heatmap"].sum() == 0 and t["reg"].sum() == 0 and not t["reg_mask"].any()
    assert encode_targets_batch([], input_size=64, stride=16)["reg"].shape == (0, 4, 4, 4)


def test_encode_equal_areas_the_later_box_wins() -> None:
    # Two 64×32 / 32×64 boxes (equal areas) both hold cell (0, 0), centered (8, 8), on a 64-px, stride-16 grid.
    wide, tall = [0.0, 0.0, 64.0, 32.0], [0.0, 0.0, 32.0, 64.0]
    for first, second in ((wide, tall), (tall, wide)):
        t = encode_targets_batch([torch.tensor([first, second])], input_size=64, stride=16)
        x_max, y_max = second[2], second[3]
        assert t["reg"][0, :, 0, 0].tolist() == [0.5, (x_max - 8) / 16, 0.5, (y_max - 8) / 16]
    # And where they share a center cell: 64×16 and 16×64 boxes centered (32, 32) → cell (2, 2) keeps the later.
    a, b = [0.0, 24.0, 64.0, 40.0], [24.0, 0.0, 40.0, 64.0]
    t = encode_targets_batch([torch.tensor([a, b])], input_size=64, stride=16)
    assert t["reg"][0, :, 2, 2].tolist() == [(40 - 24) / 16, (40 - 40) / 16, 40 / 16, 24 / 16]


def test_encode_batch_needs_no_tensor_values() -> None:
    # On the meta device, tensors have shapes but no values: .item(), .tolist(), nonzero or boolean-mask indexing
    # (each a host sync on CUDA) would raise. Passing proves the targets are computed from shapes alone.
    meta = torch.device("meta")
    boxes = [torch.empty(3, 4, device=meta), torch.empty(0, 4, device=meta), torch.empty(5, 4, device=meta)]
    t = encode_targets_batch(boxes, input_size=512, stride=32, device=meta)
    assert t["heatmap"].shape == (3, 1, 16, 16) and t["reg"].shape == (3, 4, 16, 16)
    assert t["reg_mask"].shape == (3, 16, 16) and t["reg_mask"].device == meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encode_batch_on_cuda_without_sync() -> None:
    rng = random.Random("cuda")
    cuda = torch.device("cuda")
    for size, stride, feature_size in _GRIDS:
        boxes = [_random_boxes(rng, size, stride, rng.randint(0, 5)) for _ in range(8)]
        on_gpu = [b.to(cuda) for b in boxes]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host–device synchronisation raises
        try:
            batch = encode_targets_batch(on_gpu, input_size=size, stride=stride, feature_size=feature_size)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert batch["reg"].device.type == "cuda"
        # CUDA's expf is not the CPU's: the Gaussian may differ in the last bits; the masks and distances may not.
        _assert_matches_reference(
            batch, boxes, heat_atol=1e-6, input_size=size, stride=stride, feature_size=feature_size
        )
