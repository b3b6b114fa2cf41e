"""BlendSignNet: shapes, geometry, normalisation, gradients and weight loading (blendsign.model)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision

from blendsign.config import LossConfig, ModelConfig
from blendsign.losses import total_loss
from blendsign.model import BACKBONES, STAT_STAGES, BlendSignNet, build_model, weights_file
from blendsign.targets import encode_targets

STRIDES = {"resnet18": 32, "resnet50": 32, "vgg16": 16, "inception_v3": 32}
CHANNELS = {"resnet18": 512, "resnet50": 2048, "vgg16": 512, "inception_v3": 2048}


@pytest.fixture(scope="module", params=BACKBONES)
def net(request: pytest.FixtureRequest) -> BlendSignNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=request.param, weights="none", det_channels=16)).eval()


@pytest.fixture
def tiny() -> BlendSignNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18", weights="none", det_channels=16))


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache: torch.hub.get_dir() → <tmp>/hub."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert weights_file("resnet18").is_relative_to(tmp_path), "torch.hub.set_dir() was called elsewhere"
    return tmp_path


def test_output_shapes_stride_and_feature_size(net: BlendSignNet) -> None:
    name = net.backbone_name
    assert net.stride == STRIDES[name] and net.out_channels == CHANNELS[name]
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    h = 64 // net.stride
    assert out["logits"].shape == (2, 3)
    assert out["det"].shape == (2, 5, h, h)
    assert out["features"].shape == (2, CHANNELS[name], h, h)
    assert (out["det"][:, 1:] >= 0).all()  # distances are non-negative (softplus)
    assert net.feature_size(64) == h
    assert encode_targets(torch.zeros(0, 4), input_size=64, stride=net.stride)["heatmap"].shape == (1, h, h)
    with torch.no_grad():  # a size that is no multiple of the stride
        assert net(torch.rand(1, 3, 100, 100))["det"].shape[-1] == net.feature_size(100)

    assert "stage_stats" not in out
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out, stats = net(x), net(x, stage_stats=True)
    torch.testing.assert_close(out["logits"], stats["logits"])
    assert len(stats["stage_stats"]) == len(STAT_STAGES[name])
    assert all(s.shape[0] == 2 and s.shape[1] % 2 == 0 for s in stats["stage_stats"])
    features = stats["features"].flatten(2)  # the last stage's statistics are those of the feature map
    last = stats["stage_stats"][-1]
    torch.testing.assert_close(last, torch.cat([features.mean(2), features.std(2)], 1))


def test_inception_grid_matches_resnet() -> None:
    # Inception v3 is padded inside so that its grid is the ResNets' one: 64 px → 2×2, 512 px → 16×16.
    net = BlendSignNet("inception_v3", det_channels=8)
    assert [net.feature_size(s) for s in (32, 64, 299, 512)] == [1, 2, 9, 16]
    with pytest.raises(ValueError, match="at least 32"):
        net(torch.rand(1, 3, 31, 31))


def test_detection_prior_and_heads(tiny: BlendSignNet) -> None:
    assert tiny.det_head.out.bias[0].item() == pytest.approx(-2.19)  # sigmoid(−2.19) ≈ 0.1
    assert isinstance(tiny.cls_head.fc, torch.nn.Linear) and tiny.cls_head.fc.out_features == 3


def test_normalisation_inside(tiny: BlendSignNet) -> None:
    tiny.eval()
    x = torch.rand(1, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(tiny(x)["features"], tiny.backbone((x - mean) / std), atol=1e-5)
    assert "mean" not in tiny.state_dict() and "std" not in tiny.state_dict()  # code, not learned state


def test_gradient_reaches_backbone(tiny: BlendSignNet) -> None:
    out = tiny(torch.rand(2, 3, 64, 64))
    t = encode_targets(torch.tensor([[8.0, 8.0, 40.0, 50.0]]), input_size=64, stride=tiny.stride)
    empty = encode_targets(torch.zeros(0, 4), input_size=64, stride=tiny.stride)
    batch = {
        "label": torch.tensor([2, 0]),
        **{k: torch.stack([t[k], empty[k]]) for k in ("heatmap", "reg", "reg_mask")},
    }
    total_loss(out, batch, LossConfig())["total"].backward()
    for p in (tiny.backbone.conv1.weight, tiny.backbone.layer4[1].conv2.weight, tiny.cls_head.fc.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert tiny.det_head.out.weight.grad.abs().sum() > 0


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        build_model(ModelConfig(backbone="resnet34", weights="none"))


def test_imagenet_weights_missing(torch_home: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        build_model(ModelConfig(backbone="resnet18", weights="imagenet"))
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(err.value) and "Docker" in str(err.value)


def test_imagenet_weights_from_cache(torch_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    published = torchvision.models.resnet18().state_dict()  # as torchvision publishes it, fc.* included
    path = weights_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(published, path)
    with caplog.at_level(logging.INFO, logger="blendsign.model"):
        model = build_model(ModelConfig(backbone="resnet18", weights="imagenet", det_channels=8))
    assert torch.equal(model.backbone.layer3[0].conv1.weight, published["layer3.0.conv1.weight"])
    assert torch.equal(model.backbone.bn1.running_var, published["bn1.running_var"])
    assert "ImageNet" in caplog.text and str(path) in caplog.text


def test_backbone_weights_from_path(tmp_path: Path) -> None:
    published = torchvision.models.resnet18().state_dict()
    torch.save(published, tmp_path / "r18.pth")
    model = build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "r18.pth"), det_channels=8))
    assert torch.equal(model.backbone.conv1.weight, published["conv1.weight"])
    # A backbone of the wrong kind is refused.
    with pytest.raises(ValueError, match="do not fit a resnet50 backbone"):
        build_model(ModelConfig(backbone="resnet50", weights=str(tmp_path / "r18.pth")))
    with pytest.raises(FileNotFoundError):
        build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "absent.pth")))


def test_full_state_dict_round_trip(tiny: BlendSignNet, tmp_path: Path) -> None:
    torch.save(tiny.state_dict(), tmp_path / "full.pt")
    again = build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "full.pt"), det_channels=16))
    for (name, a), b in zip(tiny.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # Also from a training checkpoint {"model": state_dict, ...}.
    torch.save({"format": 1, "model": tiny.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    from_ckpt = build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "ckpt.pt"), det_channels=16))
    assert torch.equal(from_ckpt.det_head.conv.weight, tiny.det_head.conv.weight)
    # Not a state dict at all.
    torch.save({"epoch": 3}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "junk.pt")))
    tiny.eval()
    again.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tiny(x)["det"], again(x)["det"])
