"""Grad-CAM (blendsign.explain): shape and range, localisation in a trained model, side-effect freedom, PNG overlay."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from blendsign.config import ModelConfig
from blendsign.explain import BRAIN_CHANNEL, cam_to_png, grad_cam, overlay
from blendsign.model import BlendSignNet, build_model

SQUARE = 12  # side of the bright synthetic "lesion", pixels


def _images(n: int, size: int, lesion: list[bool], gen: torch.Generator) -> tuple[Tensor, list[tuple[int, int]]]:
    """Noise ``[n, 3, size, size]`` in [0.35, 0.45], with a bright (1.0) square where ``lesion``; its (row, col)."""
    x = 0.35 + 0.1 * torch.rand(n, 3, size, size, generator=gen)
    corners = []
    for i, has in enumerate(lesion):
        r, c = torch.randint(0, size - SQUARE + 1, (2,), generator=gen).tolist()
        if has:
            x[i, :, r : r + SQUARE, c : c + SQUARE] = 1.0
        corners.append((r, c))
    return x, corners


def _tiny() -> BlendSignNet:
    return build_model(ModelConfig(backbone="resnet18", weights="none", det_channels=16))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two OpenMP threads competing with another busy process
    run this module's training ~15× slower (spin-waiting) than one thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread: None) -> BlendSignNet:
    """ResNet-18 BlendSignNet trained 20 SGD steps on 64-px noise with (class 1) or without (class 0) a square."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    y = torch.arange(8) % 2
    for _ in range(20):
        x, _ = _images(8, 64, y.bool().tolist(), gen)
        loss = F.cross_entropy(model(x)["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad()  # .grad back to None
    return model.eval()


def test_shape_and_range() -> None:
    torch.manual_seed(0)
    model = _tiny().eval()
    cam = grad_cam(model, torch.rand(3, 64, 64))
    assert cam.shape == (1, 64, 64) and cam.dtype == torch.float32
    cam = grad_cam(model, torch.rand(2, 3, 96, 80), target_class=2)
    assert cam.shape == (2, 96, 80)
    assert cam.min() >= 0 and cam.max() <= 1
    for m in cam:  # each map reaches 1 unless it is all zero
        assert m.max() == 1.0 or m.max() == 0.0
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        grad_cam(model, torch.rand(64, 64))


def _localisation(model: nn.Module, x: Tensor, corners: list[tuple[int, int]]) -> tuple[int, float]:
    """Images whose class-1 CAM peaks within one feature cell of the square; smallest inside/outside mean ratio."""
    cam = grad_cam(model, x, target_class=1)
    near, ratio = 0, float("inf")
    for m, (r, c) in zip(cam, corners, strict=True):
        inside = torch.zeros_like(m, dtype=torch.bool)
        inside[r : r + SQUARE, c : c + SQUARE] = True
        ratio = min(ratio, float(m[inside].mean() / m[~inside].mean().clamp_min(1e-12)))
        row, col = divmod(int(m.argmax()), m.shape[1])
        near += max(abs(row - (r + SQUARE / 2)), abs(col - (c + SQUARE / 2))) <= 32  # stride 32: one cell
    return near, ratio


def test_peaks_over_a_bright_lesion_in_a_trained_model(trained: BlendSignNet) -> None:
    # Held out, and at 128 px: the fully convolutional model sees a 4×4 feature grid instead of 2×2 (stride 32).
    gen = torch.Generator().manual_seed(123)
    x, corners = _images(12, 128, [True] * 12, gen)
    negatives, _ = _images(12, 128, [False] * 12, gen)
    with torch.no_grad():
        right = (trained(x)["logits"].argmax(1) == 1).sum() + (trained(negatives)["logits"].argmax(1) == 0).sum()
    assert right >= 20, f"the tiny model did not learn the task ({right}/24)"
    near, ratio = _localisation(trained, x, corners)
    assert ratio > 1.3, "CAM mass does not concentrate on the lesion"  # ~1.8 with these seeds
    assert near >= 10, f"CAM peak near the lesion in only {near}/12 images"  # 12/12 with these seeds
    torch.manual_seed(0)
    control, _ = _localisation(_tiny().eval(), x, corners)  # random init: no localisation (3/12)
    assert control < near


def test_explicit_target_class_and_no_side_effects(trained: BlendSignNet) -> None:
    model = trained
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pred = model(x)["logits"].argmax(1)
    model.train()
    model.cls_head.eval()  # a mixed state must come back as it was
    model.backbone.layer1.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    try:
        with torch.no_grad():  # works under no_grad (it enables grad inside)
            by_default = grad_cam(model, x)
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())  # nothing accumulated
        model.eval()
        same = torch.stack([grad_cam(model, x[i], target_class=int(pred[i]))[0] for i in range(2)])
        torch.testing.assert_close(by_default, same)  # None = the predicted class; run in eval mode either way
        model.requires_grad_(False)  # fully frozen: gradients still reach the features through the input
        frozen = grad_cam(model, x)
        torch.testing.assert_close(frozen, by_default)
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        model.requires_grad_(True)
        model.eval()


class _Negative(nn.Module):
    """Positive features whose every channel lowers the logit: Grad-CAM is all zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = F.avg_pool2d(x, 8) * self.w + 1.0  # [N, 3, H/8, W/8], > 0
        logits = -features.mean(dim=(1, 2, 3))[:, None].repeat(1, 3)  # [N, 3]
        return {"logits": logits, "features": features}


def test_all_zero_map_stays_zero() -> None:
    cam = grad_cam(_Negative(), torch.rand(2, 3, 32, 32))
    assert cam.shape == (2, 32, 32) and not cam.isnan().any() and (cam == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(trained: BlendSignNet) -> None:
    model = _tiny().cuda().eval()
    model.load_state_dict(trained.state_dict())
    x = torch.rand(2, 3, 64, 64)
    cam = grad_cam(model, x.cuda())
    assert cam.is_cuda and cam.shape == (2, 64, 64)
    torch.testing.assert_close(cam.cpu(), grad_cam(trained, x), atol=1e-3, rtol=1e-3)
    assert grad_cam(model, x).device.type == "cpu"  # returned on the input's device


def test_cam_to_png_is_a_png_of_the_slice_with_a_heat_map() -> None:
    image = torch.rand(3, 40, 56)
    cam = torch.zeros(40, 56)
    cam[10:20, 30:40] = 1.0
    data = cam_to_png(image, cam)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    png = Image.open(io.BytesIO(data))
    assert png.size == (56, 40) and png.mode == "RGB"
    pixels = np.asarray(png)
    np.testing.assert_array_equal(pixels, overlay(image, cam))
    grey = np.round(image[BRAIN_CHANNEL].numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels[0, 0], [grey[0, 0]] * 3)  # cam 0: the brain window, grey
    hot = pixels[15, 35].astype(int)
    assert hot.max() - hot.min() > 40  # cam 1: coloured
    with pytest.raises(ValueError, match="differ in size"):
        cam_to_png(image, torch.zeros(8, 8))
