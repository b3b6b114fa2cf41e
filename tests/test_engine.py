"""blendsign.engine: resolve_device (``auto`` falls back to the CPU; an explicit CUDA request without CUDA says what
it found)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blendsign.engine import resolve_device, softmax


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
