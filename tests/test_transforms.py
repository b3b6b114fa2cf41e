"""blendsign.transforms: windows against closed-form values, resize, augmentations keep boxes on the lesion; the
batched augmentation against torchvision's functional kernels."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from blendsign.config import DataConfig
from blendsign.transforms import (
    AFFINE_PARAMS,
    IDENTITY,
    affine_matrices,
    augment_boxes,
    augment_images,
    draw_affine,
    head_crop,
    preprocess,
    scale_boxes,
    unscale_boxes,
    window,
)

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


def _torchvision_augment(cfg: DataConfig, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """The reference: torchvision's per-slice v2 flip + affine + clamp (what the loader workers ran before the
    batched path), then boxes under a pixel dropped."""
    transform = v2.Compose([
        v2.RandomHorizontalFlip(p=cfg.hflip_p),
        v2.RandomAffine(degrees=cfg.max_rotation_deg, translate=(cfg.max_shift, cfg.max_shift),
                        scale=cfg.scale_range, interpolation=v2.InterpolationMode.BILINEAR),
        v2.ClampBoundingBoxes(),
    ])
    img, bb = transform(tv_tensors.Image(image),
                        tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format="XYXY", canvas_size=image.shape[-2:]))
    bb = bb.as_subclass(Tensor)
    keep = ((bb[:, 2] - bb[:, 0]) >= 1) & ((bb[:, 3] - bb[:, 1]) >= 1)
    return img.as_subclass(Tensor), bb[keep]


@pytest.mark.parametrize("seed", range(5))
def test_augment_moves_boxes_with_the_image(seed: int) -> None:
    """A bright square and its box: after any augmentation the box still frames the bright pixels."""
    img = torch.zeros(3, 64, 64)
    img[:, 20:30, 36:48] = 1.0  # rows 20-29, cols 36-47 → box x 36..48, y 20..30
    box = torch.tensor([[36.0, 20.0, 48.0, 30.0]])
    params = draw_affine(PAPER, 64, torch.Generator().manual_seed(seed))[None]  # [1, 5]
    out, out_box = augment_images(img[None], params)[0], augment_boxes([box], params, 64)[0]
    assert out.shape == img.shape and out_box.shape == (1, 4)
    ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
    x0, y0, x1, y1 = out_box[0].tolist()
    assert x0 - 2 <= xs.min() and xs.max() + 1 <= x1 + 2 and y0 - 2 <= ys.min() and ys.max() + 1 <= y1 + 2


# --- batched augmentation (paper §Data augmentation) against torchvision.transforms.v2.functional ---


def _pixel_centres(size: int) -> tuple[Tensor, Tensor]:
    return torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # y, x: [S, S] each


def _blobs(size: int) -> Tensor:
    """``[3, S, S]``: one smooth Gaussian blob per channel."""
    y, x = _pixel_centres(size)
    blobs = [(0.3, 0.4, 0.08), (0.65, 0.55, 0.12), (0.5, 0.25, 0.05)]  # centre x, centre y, SD: shares of S
    return torch.stack([torch.exp(-((x - cx * size) ** 2 + (y - cy * size) ** 2) / (2 * (sd * size) ** 2))
                        for cx, cy, sd in blobs])


def _ct_disc(size: int) -> Tensor:
    """``[3, S, S]``: a windowed head-like disc: skull ring, textured brain, a blood spot, air around (0 at the
    borders, sharp window edges)."""
    y, x = _pixel_centres(size)
    r = torch.hypot((x - 0.48 * size) / 0.40, (y - 0.52 * size) / 0.45) / size
    hu = torch.full((size, size), -1000.0)
    hu[r < 1.0] = 1000.0
    brain = r < 0.92
    hu[brain] = (35.0 + 5 * torch.sin(x / size * 20))[brain]
    hu[torch.hypot(x - 0.6 * size, y - 0.45 * size) < 0.1 * size] = 70.0
    return window(hu, PAPER.windows)


def _boxes(size: int) -> Tensor:
    """``[3, 4]``: inside, around the centre, and in a corner (pushed out by some of the cases)."""
    s = float(size)
    return torch.tensor([[10.0, 12.0, 30.0, 25.0], [0.3 * s, 0.5 * s, 0.6 * s, 0.8 * s], [s - 6, s - 6, s - 1, s - 2]])


def _torchvision(image: Tensor, boxes: Tensor, params: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """The reference: horizontal_flip, then affine (bilinear, no fill), clamp, boxes under a pixel dropped."""
    flip, angle, tx, ty, scale = params
    size = image.shape[-1]
    img, bb = tv_tensors.Image(image), tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(size, size))
    if flip:
        img, bb = TF.horizontal_flip(img), TF.horizontal_flip(bb)
    kw = {"angle": angle, "translate": [tx, ty], "scale": scale, "shear": [0.0, 0.0]}
    img = TF.affine(img, **kw, interpolation=InterpolationMode.BILINEAR)
    bb = TF.clamp_bounding_boxes(TF.affine(bb, **kw)).as_subclass(Tensor)
    keep = ((bb[:, 2] - bb[:, 0]) >= 1) & ((bb[:, 3] - bb[:, 1]) >= 1)
    return img.as_subclass(Tensor), bb[keep]


def _ours(image: Tensor, boxes: Tensor, params: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    p = torch.tensor([params])  # [1, 5]
    return augment_images(image[None], p)[0], augment_boxes([boxes], p, image.shape[-1])[0]


def test_affine_params_layout() -> None:
    assert AFFINE_PARAMS == ("flip", "angle", "tx", "ty", "scale") and len(IDENTITY) == len(AFFINE_PARAMS)
    m = affine_matrices(torch.tensor([IDENTITY, (1.0, 0.0, 0.0, 0.0, 1.0)]), 64)
    torch.testing.assert_close(m, torch.tensor([[[1.0, 0, 0], [0, 1, 0]], [[-1.0, 0, 64], [0, 1, 0]]]), rtol=0, atol=0)


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_identity_and_flip_match_torchvision(size: int, flip: float) -> None:
    """Images within 1e-6 (measured ≤ 4.5e-7: F.affine_grid's base grid, linspace(−1, 1, S)·(S−1)/S, misses the
    pixel centres by up to ~S·3e-8 px, where torchvision's own grid and its index flip are exact); boxes exact."""
    image, boxes = _blobs(size), _boxes(size)
    params = (flip, *IDENTITY[1:])
    (img, bb), (ref_img, ref_bb) = _ours(image, boxes, params), _torchvision(image, boxes, params)
    assert (img - ref_img).abs().max() <= 1e-6
    assert torch.equal(bb, ref_bb)


# (flip, angle, tx, ty, scale)
CASES = [
    (0.0, 10.0, 0.0, 0.0, 1.0), (0.0, -10.0, 0.0, 0.0, 1.0), (0.0, 7.3, 5.0, -3.0, 0.9), (1.0, 7.3, 5.0, -3.0, 0.9),
    (0.0, -9.1, -6.0, 4.0, 1.1), (1.0, -9.1, -6.0, 4.0, 1.1), (1.0, 3.0, 12.0, 0.0, 1.05),
]
# (max, mean) abs difference allowed; measured at S = 64 and 128: blobs ≤ 9.3e-7 / 2.1e-8, disc ≤ 1.9e-5 / 2.1e-7
# (sharp window edges turn the same ~1e-5 px grid difference into larger value differences)
TOLERANCE = {"blobs": (2e-6, 1e-7), "disc": (5e-5, 1e-6)}


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("kind", ["blobs", "disc"])
@pytest.mark.parametrize("params", CASES)
def test_affine_matches_torchvision(size: int, kind: str, params: tuple[float, ...]) -> None:
    """Rotation, integer shift, scale 0.9/1.1, with and without flip: images within TOLERANCE, boxes within 1e-3 px
    (measured ≤ 1.6e-5 px), the same boxes dropped."""
    image, boxes = (_blobs if kind == "blobs" else _ct_disc)(size), _boxes(size)
    (img, bb), (ref_img, ref_bb) = _ours(image, boxes, params), _torchvision(image, boxes, params)
    diff = (img - ref_img).abs()
    max_tol, mean_tol = TOLERANCE[kind]
    assert diff.max() <= max_tol and diff.mean() <= mean_tol
    assert bb.shape == ref_bb.shape
    torch.testing.assert_close(bb, ref_bb, rtol=0, atol=1e-3)


def test_batch_equals_each_slice_alone() -> None:
    """Mixed parameters in one batch give each slice what it gets alone (measured: bit-identical)."""
    size = 64
    images = torch.stack([_blobs(size), _ct_disc(size), _ct_disc(size).flip(-1), _blobs(size).flip(-2)])
    params = torch.tensor([IDENTITY, CASES[3], CASES[4], CASES[6]])  # [4, 5]
    boxes = [_boxes(size), torch.zeros(0, 4), _boxes(size)[:1], _boxes(size)]
    out, out_boxes = augment_images(images, params), augment_boxes(boxes, params, size)
    assert out.shape == images.shape and len(out_boxes) == len(boxes)
    for i in range(len(images)):
        torch.testing.assert_close(out[i], augment_images(images[i : i + 1], params[i : i + 1])[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(out_boxes[i], augment_boxes(boxes[i : i + 1], params[i : i + 1], size)[0])
    assert out_boxes[1].shape == (0, 4)


def test_augment_boxes_drops_boxes_pushed_out() -> None:
    inside, outside = torch.tensor([[4.0, 4.0, 10.0, 10.0]]), torch.tensor([[40.0, 40.0, 50.0, 50.0]])
    out = augment_boxes([torch.cat([inside, outside]), outside], torch.tensor([IDENTITY, IDENTITY]), 32)
    assert torch.equal(out[0], inside) and out[1].shape == (0, 4)


@pytest.mark.parametrize("seed", range(5))
def test_draw_affine_reproduces_torchvisions_random_transforms(seed: int) -> None:
    """A generator seeded as the global RNG before torchvision's transforms draws their parameters, in their order:
    the batched path then gives their image (torchvision's fill-0 mask only differs in the 1-px ring at the
    canvas edge, air in this image) and boxes."""
    size, cfg = 64, replace(PAPER, size=64)
    image, boxes = _ct_disc(size), _boxes(size)
    torch.manual_seed(seed)
    ref_img, ref_bb = _torchvision_augment(cfg, image, boxes)
    params = draw_affine(cfg, size, torch.Generator().manual_seed(seed))
    img, bb = augment_images(image[None], params[None])[0], augment_boxes([boxes], params[None], size)[0]
    assert (img - ref_img).abs().max() <= TOLERANCE["disc"][0]
    assert bb.shape == ref_bb.shape
    torch.testing.assert_close(bb, ref_bb, rtol=0, atol=1e-3)


def test_draw_affine_is_seeded_and_in_range() -> None:
    size = 64
    p = draw_affine(PAPER, size, torch.Generator().manual_seed(7))
    assert p.shape == (5,) and p.dtype == torch.float32
    assert torch.equal(p, draw_affine(PAPER, size, torch.Generator().manual_seed(7)))
    g = torch.Generator().manual_seed(0)
    flip, angle, tx, ty, scale = torch.stack([draw_affine(PAPER, size, g) for _ in range(2000)]).unbind(-1)
    assert set(flip.tolist()) == {0.0, 1.0} and 0.45 < float(flip.mean()) < 0.55
    assert -10.0 <= float(angle.min()) < -9.5 and 9.5 < float(angle.max()) <= 10.0
    max_shift = round(PAPER.max_shift * size)  # U(±6.4) rounded: −6 … 6 whole pixels
    for t in (tx, ty):
        assert torch.equal(t, t.round()) and int(t.min()) == -max_shift and int(t.max()) == max_shift
    assert 0.9 <= float(scale.min()) < 0.91 and 1.09 < float(scale.max()) <= 1.1
    never = replace(PAPER, hflip_p=0.0)
    assert all(float(draw_affine(never, size, g)[0]) == 0.0 for _ in range(500))


def test_augment_images_needs_square_images() -> None:
    with pytest.raises(ValueError, match="square"):
        augment_images(torch.zeros(1, 3, 32, 48), torch.tensor([IDENTITY]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    size = 128
    images = torch.stack([_blobs(size), _ct_disc(size), _ct_disc(size)])
    params = torch.tensor([CASES[1], CASES[3], CASES[6]])  # [3, 5]
    cpu = augment_images(images, params)
    for p in (params, params.cuda()):  # parameters drawn on the CPU or already on the device
        torch.testing.assert_close(augment_images(images.cuda(), p).cpu(), cpu, rtol=0, atol=1e-5)
