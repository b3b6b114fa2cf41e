"""Detection targets: Gaussian radius and rendering, distance encoding, decoding (blendsign.targets)."""

from __future__ import annotations

import math

import pytest
import torch

from blendsign.targets import decode_boxes, draw_gaussian, encode_targets, gaussian_radius


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
