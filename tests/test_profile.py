"""blendsign.pipelines.profile: cluster profiles from TOML, their defaults, their checks."""

from __future__ import annotations

import tomllib
from dataclasses import fields, replace
from pathlib import Path

import pytest

from blendsign.pipelines.profile import (
    GPU_TAINT,
    TASK_CLASSES,
    ClusterProfile,
    TaskProfile,
    Toleration,
    cpu_cores,
    duration_seconds,
    load_profile,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "cluster-profile-example.toml"


def test_the_example_shows_every_key_with_its_default() -> None:
    assert load_profile(EXAMPLE) == ClusterProfile() == load_profile(None)
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data["light"]) == {f.name for f in fields(TaskProfile)}  # one class spells out every key
    assert set(data) == {"image", "cpu_image", "parallelism", "defaults", *TASK_CLASSES}


def test_defaults_fit_a_one_gpu_node_of_8_vcpus() -> None:
    p = ClusterProfile()
    gpu_tasks = (p.train, p.evaluate)
    assert all(t.gpus == 1 and cpu_cores(t.cpu) <= 7 and not t.cpu_limit for t in gpu_tasks)  # allocatable < 8
    assert all(t.memory == "24Gi" and GPU_TAINT in t.tolerations for t in gpu_tasks)  # tainted GPU pools
    assert p.register.gpus == 0 and p.register.retries == 0  # CPU; a retry could register twice
    assert p.train.omp_threads == 6 and p.light.omp_threads == 1


def test_retry_window_covers_every_attempt() -> None:
    t = TaskProfile(timeout="2h", retries=3, retry_backoff="60s")
    assert t.timeout_seconds == 7200
    assert t.retry_window == f"{4 * 7200 + 60 + 120 + 240}s"  # four attempts to their timeout, three backoffs
    assert TaskProfile(retries=0, timeout="10m").retry_window == "600s"
    assert duration_seconds("1d") == 86400 and cpu_cores("500m") == 0.5


def test_a_site_profile_overrides_key_by_key(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('''image = "registry.example.org/blendsign@sha256:abc"
[defaults]
image_pull_secrets = ["regcred"]
image_pull_policy = "Always"
[train]
gpus = 2
node_selector = { "nvidia.com/gpu.product" = "NVIDIA-H100-80GB-HBM3" }
tolerations = [{ key = "dedicated", operator = "Equal", value = "ml", effect = "NoExecute", seconds = 600 }]
scratch = "200Gi"
''')
    p = load_profile(site)
    assert p.image == "registry.example.org/blendsign@sha256:abc"
    assert all(p.task(c).image_pull_secrets == ("regcred",) and p.task(c).image_pull_policy == "Always"
               for c in TASK_CLASSES)
    assert p.train.gpus == 2 and p.train.cpu == "6" and p.train.scratch == "200Gi"  # the rest stays default
    assert p.train.tolerations == (Toleration("dedicated", "Equal", "ml", "NoExecute", 600),)
    assert p.evaluate == replace(ClusterProfile().evaluate, image_pull_secrets=("regcred",),
                                 image_pull_policy="Always")
    assert p.with_gpus(0).train.gpus == 0 and p.with_gpus(1, "amd.com/gpu").evaluate.gpu_resource == "amd.com/gpu"


def test_shared_defaults_add_tolerations_and_never_retry_register(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[defaults]\nretries = 4\ntolerations = [{ key = "pool", operator = "Equal", value = "ml", '
                    'effect = "NoSchedule" }]\n')
    p = load_profile(site)
    pool = Toleration("pool", "Equal", "ml", "NoSchedule")
    assert p.train.tolerations == (GPU_TAINT, pool) and p.light.tolerations == (pool,)  # the GPU taint stays
    assert p.train.retries == p.light.retries == 4 and p.register.retries == 0


@pytest.mark.parametrize(("text", "error"), [
    ("[train]\ngpu = 1\n", r"unknown key\(s\) in \[train\]: \['gpu'\]"),
    ("[trian]\ngpus = 1\n", r"unknown section\(s\) or key\(s\) \['trian'\]"),
    ("[train]\ngpus = \"1\"\n", "gpus must be int"),
    ("[train]\nmemory = \"24GB\"\n", "memory '24GB' must be a Kubernetes quantity"),
    ("[train]\ncpu = \"6 cores\"\n", "CPU quantity '6 cores'"),
    ("[light]\ntimeout = \"30\"\n", "duration '30' must be a number with a unit"),
    ("[register]\nretries = 1\n", "register.* retries must be 0"),
    ("[data]\nimage_pull_policy = \"Sometimes\"\n", "image_pull_policy must be one of"),
    ("[train]\ntolerations = [{ key = \"a\", operator = \"Exists\", value = \"b\" }]\n", "Exists takes no value"),
    ("[train]\ntolerations = [{ key = \"a\", effect = \"Never\" }]\n", "effect one of"),
    ("[train\n", "not valid TOML"),
    ("parallelism = -1\n", "parallelism must be a whole number"),
])
def test_a_broken_profile_says_which_file_and_key(tmp_path: Path, text: str, error: str) -> None:
    site = tmp_path / "site.toml"
    site.write_text(text)
    with pytest.raises(ValueError, match=error) as exc:
        load_profile(site)
    assert str(site) in str(exc.value)


def test_a_missing_profile_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cluster profile .* not found"):
        load_profile(tmp_path / "nope.toml")
