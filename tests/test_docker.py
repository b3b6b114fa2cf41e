"""The Dockerfiles stay consistent with pyproject.toml (no Docker engine here: they are read, not built)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import blendsign
from blendsign.model import IMAGENET_WEIGHTS, weights_file

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / name).read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _python_version() -> str:
    """``3.11`` from ``requires-python = ">=3.11,<3.12"``."""
    match = re.fullmatch(r">=(\d+\.\d+),<(\d+)\.(\d+)", PYPROJECT["requires-python"].replace(" ", ""))
    assert match, PYPROJECT["requires-python"]
    assert int(match.group(3)) == int(match.group(1).split(".")[1]) + 1, "one minor version expected"
    return match.group(1)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_matches_pyproject(name: str) -> None:
    ins = _instructions(name)
    text = " ".join(f"{k} {v}" for k, v in ins)
    version = _python_version()
    base = next(v for k, v in ins if k == "FROM")
    if name == "Dockerfile":
        assert "nvidia/cuda" in base and "runtime" in base  # CUDA runtime for the GPU stages
        assert f"ARG PYTHON_VERSION={version}" in text and "python${PYTHON_VERSION} -m venv" in text
    else:
        assert base.startswith(f"python:{version}-slim")
    # Installed exactly as the README does: `pip install .` (a regular, not an editable, install).
    installs = [v for k, v in ins if k == "RUN" and "pip install" in v]
    assert installs and all(" -e " not in v and "--editable" not in v for v in installs)
    assert any(re.search(r"pip install( --extra-index-url \S+)? \.( |$)", v) for v in installs)
    assert f"import {PYPROJECT['name']}" in text
    # The console entry point of pyproject.toml is the image's entry point.
    (script, target), = PYPROJECT["scripts"].items()
    assert script == PYPROJECT["name"] and target == "blendsign.cli:main"
    entry = next(v for k, v in ins if k == "ENTRYPOINT")
    assert entry.strip() == f'["{script}"]'
    # Non-root, ImageNet weights baked into $TORCH_HOME/hub/checkpoints at build time.
    user = [v for k, v in ins if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert "TORCH_HOME=/opt/torch" in text and "bake_weights.py ${BACKBONES}" in text
    backbones = next(v for k, v in ins if k == "ARG" and v.startswith("BACKBONES="))
    assert set(backbones.split("=", 1)[1].strip("\"").split()) == set(IMAGENET_WEIGHTS)
    # Everything COPY'd is let through by .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for k, v in ins:
        if k == "COPY":
            for src in v.split()[:-1]:
                assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src


def test_weights_land_where_the_model_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", "/opt/torch")
    assert weights_file("resnet50") == Path("/opt/torch/hub/checkpoints/resnet50-0676ba61.pth")


def test_image_tags_follow_the_package_version() -> None:
    from components import images

    assert blendsign.__version__ == PYPROJECT["version"]
    assert f"ghcr.io/blendsign/blendsign:{PYPROJECT['version']}" == images.DEFAULT_IMAGE
    readme = (ROOT / "docker" / "README.md").read_text()
    assert "BLENDSIGN_IMAGE" in readme and "docker build -f docker/Dockerfile" in readme
