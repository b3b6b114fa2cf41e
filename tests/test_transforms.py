"""blendsign.transforms: windows against closed-form values, resize, augmentations keep boxes on the lesion."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from blendsign.config import DataConfig
from blendsign.transforms import Augment, head_crop, preprocess, scale_boxes, unscale_boxes, window

PAPER = DataConfig()


def test_paper_windows_closed_form() -> None:
    hu = torch.tensor([[-1000, 20, 40, 60], [70, 80, 100, 2000]], dtype=torch.int16)
    x = window(hu, PAPER.windows)
    assert x.shape == (3, 2, 4) and x.dtype == torch.float32
    # tissue 40/40 → [20, 60]; brain 50/100 → [0, 100]; blood 60/40 → [40, 80]
    torch.testing.assert_close(x[0], torch.tensor([[0, 0, 0.5, 1], [1, 1, 1, 1.0]]))
    torch.testing.assert_close(x[1], torch.tensor([[0, 0.2, 0.4, 0.6], [0.7, 0.8, 1, 1.0]]))
    torch.testing.assert_close(x[2], torch.tensor([[0, 0, 0, 0.5], [0.75, 1, 1, 1.0]]))


def test_preprocess_resizes_and_stays_in_unit_range() -> None:
    hu = torch.randint(-1000, 1500, (96, 80), dtype=torch.int16)
    x = preprocess(hu, replace(PAPER, size=64))
    assert x.shape == (3, 64, 64) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    same = preprocess(hu[:64, :64], replace(PAPER, size=64))
    torch.testing.assert_close(same, window(hu[:64, :64], PAPER.windows))  # native size: no resampling


def test_scale_boxes() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    torch.testing.assert_close(scale_boxes(boxes, rows=200, cols=100, size=50),
                               torch.tensor([[5.0, 5.0, 15.0, 15.0]]))


def test_head_crop_is_the_square_around_the_head() -> None:
    """A 40×20 head (rows 30–69, columns 50–69) in air: side 40 + 2·5 % → 44, centred on the head."""
    hu = torch.full((128, 128), -1000, dtype=torch.int16)
    hu[30:70, 50:70] = 40
    hu[120:124, 0:128] = 0  # the table: a separate, smaller region
    cfg = replace(PAPER, crop_head=True, size=64)
    assert head_crop(hu, cfg) == ((30 + 70 - 44) // 2, (50 + 70 - 44) // 2, 44) == (28, 38, 44)
    assert head_crop(hu, PAPER) is None  # off: the whole slice, as the paper
    assert head_crop(torch.full((8, 8), -1000, dtype=torch.int16), cfg) is None  # nothing but air
    x = preprocess(hu, cfg)
    canvas = hu[28:72, 38:82].clone()
    torch.testing.assert_close(x, preprocess(canvas, replace(cfg, crop_head=False)))


def test_head_crop_beyond_the_slice_pads_with_air() -> None:
    hu = torch.full((32, 32), -1000, dtype=torch.int16)
    hu[0:32, 4:12] = 60  # the head touches the top and bottom edges: the square reaches beyond them
    cfg = replace(PAPER, crop_head=True, crop_margin=0.0, size=32)
    assert head_crop(hu, cfg) == (0, -8, 32)
    x = preprocess(hu, cfg)
    assert float(x[:, :, :8].max()) == 0.0  # padded columns are air: every window 0


def test_boxes_map_into_the_crop_and_back() -> None:
    boxes = torch.tensor([[40.0, 30.0, 60.0, 50.0, 0.9]])
    crop = (28, 38, 44)
    inside = scale_boxes(boxes[:, :4], 128, 128, 88, crop)
    torch.testing.assert_close(inside, torch.tensor([[4.0, 4.0, 44.0, 44.0]]))  # (x − 38)·2, (y − 28)·2
    torch.testing.assert_close(unscale_boxes(torch.cat([inside, boxes[:, 4:]], 1), 128, 128, 88, crop), boxes)
    plain = scale_boxes(boxes[:, :4], 200, 100, 50)
    torch.testing.assert_close(unscale_boxes(plain, 200, 100, 50), boxes[:, :4])


@pytest.mark.parametrize("seed", range(5))
def test_augment_moves_boxes_with_the_image(seed: int) -> None:
    """A bright square and its box: after any augmentation the box still frames the bright pixels."""
    img = torch.zeros(3, 64, 64)
    img[:, 20:30, 36:48] = 1.0  # rows 20-29, cols 36-47 → box x 36..48, y 20..30
    box = torch.tensor([[36.0, 20.0, 48.0, 30.0]])
    torch.manual_seed(seed)
    out, out_box = Augment(PAPER)(img, box)
    assert out.shape == img.shape and out_box.shape == (1, 4)
    ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
    x0, y0, x1, y1 = out_box[0].tolist()
    assert x0 - 2 <= xs.min() and xs.max() + 1 <= x1 + 2 and y0 - 2 <= ys.min() and ys.max() + 1 <= y1 + 2


def test_augment_drops_boxes_pushed_out_of_the_image() -> None:
    cfg = replace(PAPER, hflip_p=0.0, max_rotation_deg=0.0, max_shift=0.0, scale_range=(1.0, 1.0))
    img, box = torch.zeros(3, 32, 32), torch.tensor([[40.0, 40.0, 50.0, 50.0]])  # outside the canvas
    _, out_box = Augment(cfg)(img, box)
    assert out_box.shape == (0, 4)
