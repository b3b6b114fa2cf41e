"""Grad-CAM heat maps of the classification branch (paper §Visualizing what our model learns, Figure 7).

Grad-CAM (Selvaraju et al. 2017) on the backbone's last-block feature map ``A`` (``BlendSignNet`` output
``features``, ``[N, C, h, w]``): channel weights ``w_k = mean_{i,j} ∂logit_c / ∂A_k[i, j]``, map
``ReLU(Σ_k w_k A_k)``, bilinearly upsampled to the input size and divided by its maximum. The map is as coarse as
the feature grid (``stride`` = 32 input pixels per cell for the ResNets): a coarse localisation, as the paper says.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

__all__ = ["cam_to_png", "grad_cam", "overlay"]

BRAIN_CHANNEL = 1
"""Channel of the model input holding the brain window (WL 50 / WW 100, ``DataConfig.windows``): the grey image."""


def grad_cam(model: nn.Module, image: Tensor, *, target_class: int | None = None) -> Tensor:
    """Grad-CAM of ``model``'s classification logit for ``target_class`` on its last-block features.

    Args:
        model: a :class:`~blendsign.model.BlendSignNet` (any module whose output dict has ``logits`` ``[N, K]`` and
            ``features`` ``[N, C, h, w]``), on any device. It is run in eval mode; its train/eval mode,
            ``requires_grad`` flags and ``.grad`` fields are left as they were.
        image: ``[3, H, W]`` or ``[N, 3, H, W]`` model input (window-encoded, in [0, 1]); moved to the model's
            device.
        target_class: class whose logit is explained; ``None``: each image's predicted (argmax) class.

    Returns:
        ``[N, H, W]`` float32 in [0, 1] on ``image``'s device (``N = 1`` for a ``[3, H, W]`` input); each map
        divided by its own maximum, an all-zero map (no positive evidence) stays zero.
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4:
        raise ValueError(f"expected [3, H, W] or [N, 3, H, W], got {list(image.shape)}")
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad():
            # Gradients reach the features through the input even when every parameter is frozen.
            x = image.detach().to(device=device, dtype=torch.float32).requires_grad_(True)  # [N, 3, H, W]
            out = model(x)
            features, logits = out["features"], out["logits"]  # [N, C, h, w], [N, K]
            target = (
                logits.argmax(dim=1)
                if target_class is None
                else torch.full((len(logits),), int(target_class), device=logits.device, dtype=torch.long)
            )  # [N]
            score = logits.gather(1, target[:, None]).sum()  # images are independent in eval mode
            (grads,) = torch.autograd.grad(score, features)  # [N, C, h, w]
        weights = grads.float().mean(dim=(2, 3), keepdim=True)  # [N, C, 1, 1]
        cam = F.relu((weights * features.detach().float()).sum(dim=1, keepdim=True))  # [N, 1, h, w]
        cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # [N, H, W]
        peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)  # [N, 1, 1]
        cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
        return cam.clamp_(0.0, 1.0).to(image.device)
    finally:
        for module, training in modes.items():
            module.train(training)


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)


def overlay(
    image: Tensor | np.ndarray, cam: Tensor | np.ndarray, *, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """The slice's brain window in grey with the heat map blended over it.

    Args:
        image: ``[3, H, W]`` model input in [0, 1]; channel :data:`BRAIN_CHANNEL` is shown.
        cam: ``[H, W]`` in [0, 1].
        alpha: opacity of the heat map where ``cam = 1``; it fades with ``cam`` so unimportant areas stay grey.
        cmap: a matplotlib colormap name (``jet`` as Grad-CAM figures, or ``inferno``).

    Returns:
        ``[H, W, 3]`` uint8 RGB.
    """
    grey = np.clip(_numpy(image)[BRAIN_CHANNEL], 0.0, 1.0)  # [H, W]
    heat = np.clip(_numpy(cam), 0.0, 1.0)  # [H, W]
    if grey.shape != heat.shape:
        raise ValueError(f"image {grey.shape} and cam {heat.shape} differ in size")
    colour = matplotlib.colormaps[cmap](heat)[..., :3]  # [H, W, 3]
    a = (alpha * heat)[..., None]  # [H, W, 1]
    rgb = (1.0 - a) * grey[..., None] + a * colour  # [H, W, 3]
    return np.round(rgb * 255.0).astype(np.uint8)


def cam_to_png(image: Tensor | np.ndarray, cam: Tensor | np.ndarray, *, alpha: float = 0.5, cmap: str = "jet") -> bytes:
    """PNG bytes of :func:`overlay` (``image [3, H, W]``, ``cam [H, W]`` → an ``H × W`` RGB PNG)."""
    buffer = io.BytesIO()
    Image.fromarray(overlay(image, cam, alpha=alpha, cmap=cmap)).save(buffer, format="PNG")
    return buffer.getvalue()
