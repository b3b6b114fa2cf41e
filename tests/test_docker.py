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


def _args(ins: list[tuple[str, str]]) -> dict[str, str]:
    """``ARG NAME=default`` values (quotes stripped; the last declaration wins)."""
    return {k.strip(): v.strip().strip("\"") for kind, arg in ins if kind == "ARG" and "=" in arg
            for k, v in [arg.split("=", 1)]}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_the_installed_packages(name: str) -> None:
    """pyproject.toml installs components/ and pipelines/ as blendsign.components and blendsign.pipelines."""
    ins = _instructions(name)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {src.rstrip("/"): i for i, (k, v) in enumerate(ins) if k == "COPY" for src in v.split()[:-1]}
    install = next(i for i, (k, v) in enumerate(ins) if k == "RUN" and re.search(r"pip install \.( |$)", v))
    for folder in {*setuptools["package-dir"].values(), "pyproject.toml", "README.md"} - {""}:
        assert folder in copied and copied[folder] < install, f"{folder} is not COPY'd before `pip install .`"
    assert {"components", "pipelines"} <= set(setuptools["package-dir"].values())
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[next(i for i, line in enumerate(ignore) if line.strip() and not line.startswith("#"))] == "*"
    for folder in ("src", "components", "pipelines"):
        assert f"!{folder}/" in ignore or f"!{folder}" in ignore
    # The installed packages import (the build checks it too).
    assert "import blendsign, blendsign.components, blendsign.pipelines" in ins[install][1]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_records_the_commit(name: str) -> None:
    ins = _instructions(name)
    assert _args(ins).get("GIT_COMMIT") == "unknown"
    assert ("ENV", "BLENDSIGN_GIT_COMMIT=$GIT_COMMIT") in ins
    assert any(k == "LABEL" and "org.opencontainers.image.revision=$GIT_COMMIT" in v for k, v in ins)
    # Declared after the last RUN: a new commit does not invalidate the cached install layers.
    declared = ins.index(("ARG", "GIT_COMMIT=unknown"))
    assert all(k != "RUN" for k, _ in ins[declared:])
    from blendsign import tracking

    assert tracking.COMMIT_ENV == "BLENDSIGN_GIT_COMMIT"
    readme = (ROOT / "docker" / "README.md").read_text()
    assert f"docker build -f docker/{name} " in re.sub(" +", " ", readme)
    assert "--build-arg GIT_COMMIT=$(git rev-parse HEAD)" in readme


def test_gpu_dockerfile_torch_matches_its_cuda() -> None:
    """One CUDA version (a global ARG in the FROM line) and PyTorch's wheel index for that major.minor."""
    ins = _instructions("Dockerfile")
    first_from = next(i for i, (k, _) in enumerate(ins) if k == "FROM")
    global_args = _args(ins[:first_from])
    cuda = global_args["CUDA"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", cuda), cuda
    assert ins[first_from][1] == "nvidia/cuda:${CUDA}-cudnn-runtime-ubuntu22.04"
    index = _args(ins[first_from:])["TORCH_INDEX"]
    major, minor, _ = cuda.split(".")
    assert index == f"https://download.pytorch.org/whl/cu{major}{minor}"
    runs = [v for k, v in ins if k == "RUN"]
    torch_install = next(v for v in runs if "--index-url" in v)
    assert 'pip install --index-url "$TORCH_INDEX" $reqs' in torch_install and "--extra-index-url" not in torch_install
    assert "'torch', 'torchvision'" in torch_install and "pyproject.toml" in torch_install
    # The build fails unless torch.version.cuda has the base image's ($CUDA_VERSION) major.minor.
    check = next(v for v in runs if "torch.version.cuda" in v and "sys.exit" in v)
    assert "os.environ['CUDA_VERSION']" in check
    assert runs.index(torch_install) < runs.index(check)
    readme = (ROOT / "docker" / "README.md").read_text()
    assert f"CUDA={cuda}" in readme and index in readme and "--build-arg CUDA=" in readme
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu" in readme


def test_cpu_dockerfile_gets_cpu_torch() -> None:
    ins = _instructions("Dockerfile.cpu")
    assert _args(ins)["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = [v for k, v in ins if k == "RUN"]
    assert any('pip install --index-url "$TORCH_INDEX" $reqs' in v for v in runs)
    assert any("torch.version.cuda is None or sys.exit" in v for v in runs)


def test_readme_runs_by_digest() -> None:
    readme = (ROOT / "docker" / "README.md").read_text()
    assert "--metadata-file meta.json" in readme and "jq -r '.\"containerimage.digest\"' meta.json" in readme
    assert "{{index .RepoDigests 0}}" in readme
    assert "BLENDSIGN_IMAGE=$REGISTRY/blendsign@" in readme and "BLENDSIGN_CPU_IMAGE=$REGISTRY/blendsign@" in readme
    assert "BLENDSIGN_IMAGE_REF" in readme


def test_weights_land_where_the_model_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", "/opt/torch")
    assert weights_file("resnet50") == Path("/opt/torch/hub/checkpoints/resnet50-0676ba61.pth")


def test_image_tags_follow_the_package_version() -> None:
    from blendsign.components import images

    assert blendsign.__version__ == PYPROJECT["version"]
    assert f"ghcr.io/blendsign/blendsign:{PYPROJECT['version']}" == images.DEFAULT_IMAGE
    readme = (ROOT / "docker" / "README.md").read_text()
    assert "BLENDSIGN_IMAGE" in readme and "docker build -f docker/Dockerfile" in readme
