"""Cluster profiles: what the compiled pipeline asks of Kubernetes, per task class, from a TOML file.

``blendsign pipeline compile --profile site.toml`` reads one; every key is optional and shown, with its
default, in ``configs/cluster-profile-example.toml``. The defaults fit a common one-GPU node of 8–16 vCPUs
(allocatable CPU is below the node's count: requests stay under 7 CPUs; CPU limits are not set, so a task may
use idle cores without being throttled; memory request = limit).

Task classes: ``light`` (check_inputs, snapshot, start_run, check_new_data, no_new_data, the exit handler),
``data`` (ingest, fuse, folds), ``train`` (train_teacher, distill), ``evaluate``, ``register``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from blendsign.config import read_toml
from blendsign.errors import ConfigError

TASK_CLASSES = ("light", "data", "train", "evaluate", "register")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
TOLERATION_OPERATORS = ("Equal", "Exists")
TAINT_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DURATION = re.compile(r"^([0-9]+)(s|m|h|d)$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Toleration:
    """A Kubernetes toleration (tainted GPU pools: ``key = "nvidia.com/gpu", operator = "Exists"``)."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""
    seconds: int | None = None  # tolerationSeconds (NoExecute only)


@dataclass(frozen=True)
class TaskProfile:
    """One task class's pod: resources, placement, limits."""

    cpu: str = "1"  # CPU request (no CPU limit unless cpu_limit)
    cpu_limit: str = ""  # "": none (CPU limits throttle data loaders; requests alone schedule the pod)
    memory: str = "2Gi"  # memory request = limit (a /dev/shm mount counts against it)
    gpus: int = 0  # accelerators per pod
    gpu_resource: str = "nvidia.com/gpu"  # the accelerator's resource name
    node_selector: dict[str, str] = field(default_factory=dict)  # e.g. {"nvidia.com/gpu.product" = "NVIDIA-H100..."}
    tolerations: tuple[Toleration, ...] = ()
    timeout: str = "6h"  # the pod's activeDeadlineSeconds (from when a node accepts it): a pod that hangs is stopped
    retries: int = 0  # retries of a failed pod; their backoff window covers the whole job (timeout × attempts)
    retry_backoff: str = "60s"  # the first retry's delay (then doubling)
    threads: int = 0  # OMP_NUM_THREADS (0: the CPU request, at least 1)
    scratch: str = ""  # size of a generic ephemeral volume at /scratch for temporary files (TMPDIR); "": none
    scratch_storage_class: str = ""  # its storage class ("": the cluster's default)
    image_pull_policy: str = ""  # "": Kubernetes' default (IfNotPresent for tagged images)
    image_pull_secrets: tuple[str, ...] = ()

    @property
    def timeout_seconds(self) -> int:
        return duration_seconds(self.timeout)

    @property
    def omp_threads(self) -> int:
        return self.threads or max(1, int(cpu_cores(self.cpu)))

    @property
    def retry_window(self) -> str:
        """Argo's ``backoff.maxDuration`` is a window from the first attempt's start: a retry is only made inside
        it, so it must cover every attempt running to its timeout, plus the backoffs."""
        backoff = duration_seconds(self.retry_backoff)
        total = (self.retries + 1) * self.timeout_seconds + sum(backoff * 2**i for i in range(self.retries))
        return f"{total}s"


GPU_TAINT = Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")  # GPU pools' usual taint
DEFAULTS: dict[str, TaskProfile] = {
    "light": TaskProfile(cpu="0.5", memory="1Gi", timeout="30m", retries=2, retry_backoff="30s"),
    "data": TaskProfile(cpu="4", memory="12Gi", timeout="8h", retries=1, retry_backoff="60s"),
    "train": TaskProfile(cpu="6", memory="24Gi", gpus=1, tolerations=(GPU_TAINT,), timeout="24h", retries=3,
                         retry_backoff="120s"),
    "evaluate": TaskProfile(cpu="6", memory="24Gi", gpus=1, tolerations=(GPU_TAINT,), timeout="8h", retries=2,
                            retry_backoff="120s"),
    # one attempt: a retry after a partial registration would add a second version
    "register": TaskProfile(cpu="2", memory="8Gi", timeout="2h", retries=0),
}


@dataclass(frozen=True)
class ClusterProfile:
    """Every task class's pod, and the images (default: ``blendsign.components.images``)."""

    light: TaskProfile = DEFAULTS["light"]
    data: TaskProfile = DEFAULTS["data"]
    train: TaskProfile = DEFAULTS["train"]
    evaluate: TaskProfile = DEFAULTS["evaluate"]
    register: TaskProfile = DEFAULTS["register"]
    image: str = ""  # the GPU image ("": $BLENDSIGN_IMAGE or the default); a digest reference pins it
    cpu_image: str = ""  # the CPU image ("": $BLENDSIGN_CPU_IMAGE or the GPU image's name + "-cpu")
    parallelism: int = 0  # training jobs (pods) at once (0: all: the K folds and the refit together)

    def task(self, name: str) -> TaskProfile:
        return getattr(self, name)

    def with_gpus(self, gpus: int, gpu_resource: str | None = None) -> ClusterProfile:
        """The GPU task classes (train, evaluate) with ``gpus`` accelerators of ``gpu_resource``."""
        def gpu(t: TaskProfile) -> TaskProfile:
            return replace(t, gpus=gpus, gpu_resource=gpu_resource or t.gpu_resource)

        return replace(self, train=gpu(self.train), evaluate=gpu(self.evaluate))


def duration_seconds(text: str) -> int:
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"duration {text!r} must be a number with a unit s, m, h or d (e.g. 90m, 24h)")
    return int(m.group(1)) * _SECONDS[m.group(2)]


def cpu_cores(text: str) -> float:
    if not _QUANTITY.match(text) or text.endswith(("k", "M", "G", "T", "P", "E", "i")):
        raise ConfigError(f"CPU quantity {text!r} must be cores (e.g. 6, 0.5) or millicores (e.g. 500m)")
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _check_memory(text: str, what: str) -> None:
    if not _QUANTITY.match(text) or text.endswith("m"):
        raise ConfigError(f"{what} {text!r} must be a Kubernetes quantity such as 24Gi or 512Mi")


def _task(name: str, data: dict[str, Any], base: TaskProfile, source: str) -> TaskProfile:
    known = {f.name for f in fields(TaskProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) in [{name}]: {unknown} (known: {sorted(known)})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        default = getattr(base, key)
        if key == "tolerations":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(f"{source}: [{name}] tolerations must be a list of tables")
            values[key] = tuple(_toleration(t, f"{source}: [{name}] toleration") for t in value)
        elif key == "image_pull_secrets":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{source}: [{name}] image_pull_secrets must be a list of secret names")
            values[key] = tuple(value)
        elif key == "node_selector":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{source}: [{name}] node_selector must be a table of label = \"value\"")
            values[key] = dict(value)
        elif type(value) is not type(default):
            raise ConfigError(f"{source}: [{name}] {key} must be {type(default).__name__}, got {value!r}")
        else:
            values[key] = value
    task = replace(base, **values)
    where = f"{source}: [{name}]"
    try:
        cpu_cores(task.cpu)
        if task.cpu_limit:
            cpu_cores(task.cpu_limit)
        _check_memory(task.memory, "memory")
        if task.scratch:
            _check_memory(task.scratch, "scratch")
        duration_seconds(task.timeout)
        duration_seconds(task.retry_backoff)
    except ValueError as exc:
        raise ConfigError(f"{where} {exc}") from None
    if task.gpus < 0 or task.retries < 0 or task.threads < 0:
        raise ConfigError(f"{where} gpus, retries and threads must be ≥ 0")
    if name == "register" and task.retries:
        raise ConfigError(f"{where} retries must be 0: a retry after a partial registration would register twice")
    if task.image_pull_policy and task.image_pull_policy not in PULL_POLICIES:
        raise ConfigError(f"{where} image_pull_policy must be one of {list(PULL_POLICIES)}")
    return task


def _toleration(data: dict[str, Any], where: str) -> Toleration:
    known = {f.name for f in fields(Toleration)}
    if set(data) - known:
        raise ConfigError(f"{where}: unknown key(s) {sorted(set(data) - known)} (known: {sorted(known)})")
    t = Toleration(**data)
    if t.operator not in TOLERATION_OPERATORS or t.effect not in TAINT_EFFECTS:
        raise ConfigError(f"{where}: operator must be one of {list(TOLERATION_OPERATORS)}, effect one of "
                         f"{[e for e in TAINT_EFFECTS if e]} (or empty)")
    if t.operator == "Exists" and t.value:
        raise ConfigError(f"{where}: operator Exists takes no value")
    return t


def _merged(name: str, shared: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``[defaults]`` under a class's own keys. Tolerations add up (the class's, or its default ones, and the
    shared ones: a shared toleration does not remove the GPU tasks' GPU-taint one); ``retries`` in
    ``[defaults]`` skips ``register``, which is never retried."""
    merged = {**{k: v for k, v in shared.items() if not (name == "register" and k == "retries")}, **own}
    if "tolerations" in shared and isinstance(shared["tolerations"], list):
        base = own.get("tolerations", [asdict(t) for t in DEFAULTS[name].tolerations])
        merged["tolerations"] = [*base, *(t for t in shared["tolerations"] if t not in base)]
    return merged


def load_profile(path: str | Path | None) -> ClusterProfile:
    """The profile in TOML file ``path`` (None: the defaults). ``[defaults]`` applies to every task class,
    ``[light]``, ``[data]``, ``[train]``, ``[evaluate]``, ``[register]`` override it; top-level ``image`` and
    ``cpu_image`` name the images. Unknown keys and wrong types are errors that name the file and key."""
    if path is None:
        return ClusterProfile()
    path = Path(path)
    data = read_toml(path, "cluster profile")
    unknown = sorted(set(data) - {*TASK_CLASSES, "defaults", "image", "cpu_image", "parallelism"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) or key(s) {unknown}; sections: defaults, "
                         f"{', '.join(TASK_CLASSES)}; keys: image, cpu_image, parallelism")
    for key in ("image", "cpu_image"):
        if not isinstance(data.get(key, ""), str):
            raise ConfigError(f"{path}: {key} must be an image reference (a string)")
    parallelism = data.get("parallelism", 0)
    if type(parallelism) is not int or parallelism < 0:
        raise ConfigError(f"{path}: parallelism must be a whole number ≥ 0 (0: every training job at once)")
    shared = data.get("defaults", {})
    tasks = {name: _task(name, _merged(name, shared, data.get(name, {})), DEFAULTS[name], str(path))
             for name in TASK_CLASSES}
    return ClusterProfile(**tasks, image=data.get("image", ""), cpu_image=data.get("cpu_image", ""),
                          parallelism=parallelism)
