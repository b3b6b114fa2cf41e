"""blendsign.engine: resolve_device (``auto`` falls back to the CPU; an explicit CUDA request without CUDA says what
it found); the training epoch checks for a non-finite loss at its host syncs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blendsign.engine import SYNC_EVERY, amp_dtype, resolve_device, softmax, train_one_epoch


def _cuda(monkeypatch: pytest.MonkeyPatch, count: int, build: str | None = "12.8") -> None:
    """Pretend this process sees ``count`` CUDA devices through a torch built for CUDA ``build`` (None: CPU-only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.version, "cuda", build)


def test_auto_and_cpu() -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_without_cuda_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_names_the_build() -> None:
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    with pytest.raises(ValueError, match="no CUDA device") as err:
        resolve_device("cuda")
    message = str(err.value)
    assert build in message and "is_available() is False" in message and "docker/README.md" in message


def test_cuda_build_without_device_blames_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 0, "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError) as err:
        resolve_device("cuda")
    message = str(err.value)
    assert "'cuda' requested but no CUDA device is usable here" in message
    assert f"torch {torch.__version__} is built for CUDA 12.8" in message
    assert "is_available() is False, 0 CUDA device(s)" in message and "CUDA_VISIBLE_DEVICES=''" in message
    assert "NVIDIA driver may be older than CUDA 12.8 needs" in message
    assert "image built for the node's CUDA (docker/README.md)" in message and "compile the pipeline for CPU" in message
    with pytest.raises(ValueError, match="no CUDA device is usable here"):
        resolve_device("cuda:0")


def test_cpu_only_build(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 0, None)
    with pytest.raises(ValueError, match="is a CPU-only build") as err:
        resolve_device("cuda")
    assert "docker/README.md" in str(err.value) and "driver" not in str(err.value)


def test_cuda_index_beyond_the_device_count(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 1)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"'cuda:3' requested but only 1 CUDA device\(s\) are visible") as err:
        resolve_device("cuda:3")
    assert "use cuda:0, cuda or auto" in str(err.value)
    _cuda(monkeypatch, 2)
    with pytest.raises(ValueError, match="use cuda:0 to cuda:1, cuda or auto"):
        resolve_device("cuda:2")


def test_unknown_device() -> None:
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_softmax_in_closed_form() -> None:
    """exp(0) : exp(ln 2) = 1 : 2; a temperature T divides the logits; a large shift changes nothing (no overflow)."""
    np.testing.assert_allclose(softmax(np.array([[0.0, np.log(2)]])), [[1 / 3, 2 / 3]])
    np.testing.assert_allclose(softmax(np.array([[0.0, 2 * np.log(2)]]), temperature=2.0), [[1 / 3, 2 / 3]])
    np.testing.assert_allclose(softmax(np.array([[1000.0, 1000.0 + np.log(2)]])), [[1 / 3, 2 / 3]])


def _batches(n: int, nan_at: int | None) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of two 64² slices of the ci model's form (no boxes); batch ``nan_at`` (1-based) holds a NaN."""
    out = []
    for b in range(1, n + 1):
        image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(b))
        if b == nan_at:
            image[0, 0, 0, 0] = float("nan")
        out.append({"image": image, "label": torch.tensor([0, 1]), "heatmap": torch.zeros(2, 1, 2, 2),
                    "reg": torch.zeros(2, 4, 2, 2), "reg_mask": torch.zeros(2, 2, 2, dtype=torch.bool)})
    return out


def _epoch(batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    from blendsign.config import load_preset
    from blendsign.model import build_model

    cfg = load_preset("ci")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_one_epoch(model, batches, opt, sched, scaler, loss_cfg=cfg.loss, device=torch.device("cpu"),
                           amp=False, channels_last=False, progress=False)


@pytest.mark.parametrize(("n", "nan_at", "where"), [
    (SYNC_EVERY + 5, 3, f"1–{SYNC_EVERY}"),
    (SYNC_EVERY + 5, SYNC_EVERY + 2, f"{SYNC_EVERY + 1}–{SYNC_EVERY + 5}"),
])
def test_a_non_finite_loss_is_caught_at_the_next_sync_naming_its_batches(n: int, nan_at: int, where: str) -> None:
    with pytest.raises(FloatingPointError, match=f"non-finite loss in batches {where}$"):
        _epoch(_batches(n, nan_at))


def test_a_finite_epoch_reports_its_mean_losses() -> None:
    metrics = _epoch(_batches(3, None))
    assert np.isfinite(metrics["loss_total"]) and metrics["images_per_s"] > 0 and metrics["lr"] == 1e-4


def test_amp_dtype_is_float16_off_cuda() -> None:
    assert amp_dtype(torch.device("cpu")) == torch.float16
