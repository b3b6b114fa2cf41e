"""BlendSignNet: an ImageNet backbone with a classification and a detection branch (paper §Overview, Figure 4).

The feature map of the backbone's last convolutional block ("block L") feeds

* the classification branch (paper §Pre-trained networks): global average pooling + one linear layer → 3 logits;
* the detection branch (paper §Detection branch): two convolutional layers → a 5-channel key-point map at the
  feature stride: channel 0 is the center-point logit, channels 1–4 the distances from a cell's center to the
  box's left, right, top and bottom sides, in units of the feature stride (see :mod:`blendsign.targets`).

Geometry: feature cell ``j`` of a row (column) stands for input pixels ``[j·stride, (j+1)·stride)``, its center
at ``(j + 0.5)·stride``. For inputs that are a multiple of the stride (512, 128, 64: every preset) the feature map
is exactly ``input_size / stride`` cells wide for every backbone; :meth:`BlendSignNet.feature_size` gives it for
any size.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import (
    Inception_V3_Weights,
    ResNet18_Weights,
    ResNet50_Weights,
    VGG16_Weights,
    WeightsEnum,
)

from blendsign import checkpoint, ood
from blendsign.checkpoint import read_state_dict
from blendsign.config import Config, ModelConfig
from blendsign.errors import ConfigError, InputError

log = logging.getLogger(__name__)

__all__ = ["BACKBONES", "IMAGENET_WEIGHTS", "BlendSignNet", "build_model", "load_trained", "weights_file"]

IMAGENET_WEIGHTS: dict[str, WeightsEnum] = {
    # IMAGENET1K_V1 throughout: the torchvision weights of the paper's time (ResNet-50's V2 recipe came in 2022).
    "resnet18": ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "vgg16": VGG16_Weights.IMAGENET1K_V1,
    "inception_v3": Inception_V3_Weights.IMAGENET1K_V1,
}
"""The torchvision ImageNet weights each backbone starts from when ``ModelConfig.weights == "imagenet"``."""

BACKBONES: tuple[str, ...] = tuple(IMAGENET_WEIGHTS)

# Input normalisation the pretrained weights expect, as (mean, std) per RGB channel. torchvision's Inception v3
# weights (ported from TensorFlow) expect x·2 − 1, which is what its ``transform_input=True`` computes.
_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_NORM: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "resnet18": _IMAGENET_NORM,
    "resnet50": _IMAGENET_NORM,
    "vgg16": _IMAGENET_NORM,
    "inception_v3": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# Nominal stride (input pixels per feature cell) of each backbone's last convolutional block.
_STRIDE = {"resnet18": 32, "resnet50": 32, "vgg16": 16, "inception_v3": 32}
# The trunk's stages whose statistics the out-of-distribution score reads (blendsign.ood): each ResNet stage, three
# Inception stages; VGG16's trunk is one Sequential, so only its last block.
STAT_STAGES: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("layer1", "layer2", "layer3", "layer4"),
    "vgg16": ("features",),
    "inception_v3": ("Mixed_5d", "Mixed_6e", "Mixed_7c"),
}

# Inception v3 uses unpadded ("valid") convolutions: an N-px input gives a ((N − 75) // 32 + 1)-cell map whose
# cell j is centered on input pixel 32·j + 37.5. Padding the input by 21 px before and 22 px after (value 0 =
# air, below every CT window) makes its grid that of the ResNets: N/32 cells centered on 32·j + 16.5.
_INCEPTION_PAD = (21, 22)

# (kernel, stride, padding) of every layer that changes the spatial size, in order, for feature_size().
_RESNET_OPS = [(7, 2, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 2, 1)]  # conv1, maxpool, layer2-4 (3×3 s2 / 1×1 s2)
_VGG_OPS = [(2, 2, 0)] * 4  # the four max-pools before the last conv block
_INCEPTION_OPS = [(3, 2, 0), (3, 1, 0), (3, 2, 0), (3, 1, 0), (3, 2, 0), (3, 2, 0), (3, 2, 0)]
# ^ Conv2d_1a, Conv2d_2a, maxpool1, Conv2d_4a, maxpool2, Mixed_6a, Mixed_7a (the other layers keep the size)


def weights_file(backbone: str) -> Path:
    """Where the ImageNet weights of ``backbone`` must lie: torch's hub cache, named as torchvision names them.

    That is ``$TORCH_HOME/hub/checkpoints/<file>`` (``~/.cache/torch/hub/checkpoints/<file>`` by default), the
    path ``torch.hub.load_state_dict_from_url`` would download to; e.g. ``resnet50-0676ba61.pth``.
    """
    _check_backbone(backbone)
    name = Path(urlparse(IMAGENET_WEIGHTS[backbone].url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


class BlendSignNet(nn.Module):
    """Backbone + classification branch + detection branch (paper Figure 4).

    Build it with :func:`build_model`. Input: window-encoded slices in [0, 1]; the backbone's normalisation is
    applied inside (buffers ``mean`` and ``std``), so training, evaluation and serving feed the same tensors.

    Args:
        backbone: one of :data:`BACKBONES`.
        num_classes: classification outputs (3: non_ich, normal_ich, blend_sign).
        det_channels: width of the detection branch's first (3×3) convolution.

    Attributes:
        stride: input pixels per feature cell (32 for the ResNets and Inception v3, 16 for VGG16).
        out_channels: channels ``C`` of the backbone's feature map (2048, 512, 512, 2048).
    """

    mean: torch.Tensor  # the buffers, declared: nn.Module's attribute lookup types them as Tensor | Module
    std: torch.Tensor

    def __init__(self, backbone: str, *, num_classes: int = 3, det_channels: int = 256) -> None:
        super().__init__()
        _check_backbone(backbone)
        self.backbone_name = backbone
        self.backbone, self.out_channels = _make_trunk(backbone)
        self.stride = _STRIDE[backbone]
        mean, std = _NORM[backbone]
        # Not persistent: a property of the backbone (code), not learned state.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        # Classification branch: GAP + one linear layer (paper §Pre-trained networks).
        self.cls_head = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(1),
                fc=nn.Linear(self.out_channels, num_classes),
            )
        )
        # Detection branch: two convolutional layers (paper §Detection branch).
        conv = nn.Conv2d(self.out_channels, det_channels, kernel_size=3, padding=1)
        out = nn.Conv2d(det_channels, 5, kernel_size=1)
        assert conv.bias is not None and out.bias is not None  # (Conv2d types its bias Tensor | None)
        self.det_head = nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(inplace=True), out=out))
        for weight, bias in ((conv.weight, conv.bias), (out.weight, out.bias)):  # as torchvision's FCOS / CenterNet
            nn.init.normal_(weight, std=0.01)
            nn.init.zeros_(bias)
        # Center-point prior 0.1 (CenterNet): sigmoid(−2.19) ≈ 0.1, so the many background cells start quiet.
        with torch.no_grad():
            out.bias[0] = -2.19

    def feature_size(self, input_size: int) -> int:
        """Side of the feature map (and of the detection map) for a square ``input_size`` × ``input_size`` input.

        ``input_size // stride`` when ``input_size`` is a multiple of the stride; ``ceil`` (ResNets) or
        ``floor`` (VGG16, Inception v3) of ``input_size / stride`` otherwise.
        """
        size = input_size
        if self.backbone_name == "inception_v3":
            size, ops = size + sum(_INCEPTION_PAD), _INCEPTION_OPS
        elif self.backbone_name == "vgg16":
            ops = _VGG_OPS
        else:
            ops = _RESNET_OPS
        for kernel, stride, padding in ops:
            size = (size + 2 * padding - kernel) // stride + 1
        return size

    def forward(self, x: Tensor, *, stage_stats: bool = False) -> dict[str, Any]:
        """Run both branches.

        Args:
            x: window-encoded slices, ``[N, 3, H, W]`` in [0, 1] (H, W ≥ ``stride``).
            stage_stats: also return ``stage_stats``, for :mod:`blendsign.ood`.

        Returns:
            ``logits`` ``[N, num_classes]``; ``det`` ``[N, 5, h, w]`` (channel 0: center logit; 1–4: left, right,
            top, bottom distances in stride units, ≥ 0 via softplus); ``features`` ``[N, C, h, w]``, the last
            block's feature map (Grad-CAM); with ``stage_stats``, a list with, per stage of :data:`STAT_STAGES`,
            the channels' spatial mean and standard deviation ``[N, 2·C_stage]`` (Lee et al. 2018's
            feature ensemble: early stages see texture and noise, the last one content).
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input of shape [N, 3, H, W], got {list(x.shape)}")
        if min(x.shape[-2:]) < self.stride:
            note = (
                " (its 75-px minimum less the 43 px of padding added inside)"
                if self.backbone_name == "inception_v3"
                else ""
            )
            raise ValueError(
                f"{self.backbone_name} needs inputs of at least {self.stride}×{self.stride} px{note}, "
                f"got {x.shape[-2]}×{x.shape[-1]}"
            )
        if self.backbone_name == "inception_v3":
            before, after = _INCEPTION_PAD
            x = F.pad(x, (before, after, before, after), value=0.0)  # [N, 3, H + 43, W + 43]
        x = (x - self.mean) / self.std  # [N, 3, H, W]
        stats: list[Tensor] = []
        for name, stage in self.backbone.named_children():
            x = stage(x)
            if stage_stats and name in STAT_STAGES[self.backbone_name]:
                stats.append(torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).float())  # [N, 2·C_stage]
        features = x  # [N, C, h, w]
        logits = self.cls_head(features)  # [N, num_classes]
        det = self.det_head(features)  # [N, 5, h, w]
        det = torch.cat([det[:, :1], F.softplus(det[:, 1:])], dim=1)  # distances ≥ 0, smooth gradient everywhere
        out: dict[str, Any] = {"logits": logits, "det": det, "features": features}
        if stage_stats:
            out["stage_stats"] = stats
        return out


def build_model(cfg: ModelConfig) -> BlendSignNet:
    """The model ``cfg`` describes, with its weights loaded (on the CPU; move it with ``.to(device)``).

    Args:
        cfg: ``backbone`` (one of :data:`BACKBONES`), ``num_classes``, ``det_channels`` and ``weights``:
            ``"imagenet"``: torchvision's ImageNet weights for the backbone, read from the local torch hub cache
            (:func:`weights_file`; never downloaded); ``"none"``: random initialisation; otherwise the path of a
            state dict: either a backbone state dict as torchvision publishes it (its classifier keys are
            ignored) or a full :class:`BlendSignNet` state dict (keys ``backbone.*``, ``cls_head.*``,
            ``det_head.*``), also inside a training checkpoint ``{"model": state_dict, ...}``.

    Raises:
        ValueError: unknown backbone, or a state dict that fits neither form.
        FileNotFoundError: the ImageNet weights file is not in the torch cache, or the path does not exist.
    """
    model = BlendSignNet(cfg.backbone, num_classes=cfg.num_classes, det_channels=cfg.det_channels)
    if cfg.weights == "none":
        log.info("model %s: random initialisation (weights=none)", cfg.backbone)
    elif cfg.weights == "imagenet":
        path = weights_file(cfg.backbone)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet weights for {cfg.backbone} not found: expected {path} "
                f"(torchvision's {IMAGENET_WEIGHTS[cfg.backbone]}, downloadable from "
                f"{IMAGENET_WEIGHTS[cfg.backbone].url}). blendsign never downloads. Copy that file into "
                f"{path.parent} (the torch hub cache; set TORCH_HOME to move it), or pass its path as the "
                f"model weights, or use the Docker image that bakes it in, or choose weights='none'."
            )
        _load_backbone(model, read_state_dict(path))
        log.info("model %s: backbone weights = ImageNet %s from %s", cfg.backbone, IMAGENET_WEIGHTS[cfg.backbone], path)
    else:
        path = Path(cfg.weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"model weights file {path} not found (weights must be 'imagenet', 'none' or a path)"
            )
        state = read_state_dict(path)
        if any(k.startswith(("backbone.", "cls_head.", "det_head.")) for k in state):
            model.load_state_dict(state, strict=True)
            log.info("model %s: full BlendSignNet weights from %s", cfg.backbone, path)
        else:
            _load_backbone(model, state)
            log.info("model %s: backbone weights from %s (heads randomly initialised)", cfg.backbone, path)
    return model


def load_trained(path: str | Path, device: torch.device) -> tuple[BlendSignNet, Config, dict[str, Any] | None]:
    """A trained model from a checkpoint (:mod:`blendsign.checkpoint`): in eval mode on ``device`` with its
    parameters frozen (Grad-CAM still reaches the features through the input), its config (the preprocessing it
    was trained with) and its out-of-distribution statistics (None in a checkpoint from before they existed or of
    an older version, :func:`blendsign.ood.usable`)."""
    state = checkpoint.load(path)
    cfg = checkpoint.config_of(state)
    model = BlendSignNet(cfg.model.backbone, num_classes=cfg.model.num_classes, det_channels=cfg.model.det_channels)
    model.load_state_dict(state["model"])  # the trained weights: no backbone initialisation first
    model.to(device).eval().requires_grad_(False)
    return model, cfg, ood.usable(state.get("ood"), str(path))


def _check_backbone(backbone: str) -> None:
    if backbone not in IMAGENET_WEIGHTS:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")


def _make_trunk(backbone: str) -> tuple[nn.Sequential, int]:
    """torchvision's network up to its last convolutional block, with torchvision's parameter names kept.

    Returns the trunk (``[N, 3, H, W]`` normalised → ``[N, C, h, w]``) and ``C``.
    """
    if backbone in ("resnet18", "resnet50"):
        net = getattr(torchvision.models, backbone)(weights=None)
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        channels = net.fc.in_features
    elif backbone == "vgg16":
        net = torchvision.models.vgg16(weights=None)
        # Up to and including the last conv + ReLU (features[29]); features[30] is the final max-pool.
        trunk = nn.Sequential(OrderedDict(features=net.features[:30]))
        return trunk, 512
    else:  # inception_v3, without aux logits; transform_input is done by the model's normalisation
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=True)
        names = [
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
            "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
            "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
        ]  # fmt: skip
        channels = net.fc.in_features
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names)), channels


def _load_backbone(model: BlendSignNet, state: Mapping[str, Tensor]) -> None:
    """Load a torchvision-style backbone state dict into ``model.backbone``; its other keys (fc, ...) are ignored."""
    wanted = model.backbone.state_dict().keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise InputError(
            f"weights do not fit a {model.backbone_name} backbone: {len(missing)} of its {len(wanted)} tensors "
            f"missing (first: {missing[:3]}); expected torchvision's {model.backbone_name} state dict or a full "
            f"BlendSignNet state dict"
        )
    model.backbone.load_state_dict({k: state[k] for k in wanted}, strict=True)
