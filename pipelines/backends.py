"""Which Kubeflow Pipelines backends run which compiled variant of the pipeline, and a check of the server.

Two variants compile from the same definition (``blendsign_pipeline.build_pipeline``):

- ``current`` (backend ≥ 2.16.0): the fold models fan in to ``evaluate`` and ``register`` as artifacts
  (``dsl.Collected``, resolved from 2.14.0; from a loop with a ``name`` only from 2.16.0), tasks and the loop
  carry display names, the exit handler receives the run's final status (real from 2.17.0; earlier it can
  read RUNNING, and the runs are ended as failed ones would be).
- ``compat`` (backend ≥ 2.5.0, the Kubeflow 1.10 platform): no fan-in (2.5.0's driver cannot resolve
  ``dsl.Collected``): ``evaluate`` and ``register`` wait for the loop and read the models each job exported to
  the run's work prefix; no display names (2.5.0 cannot resolve the outputs of a renamed task); an exit
  handler without the final status (2.5.0's compiler rejects a run that passes it).

Both mount the credentials secret as a volume (2.14.x rejects the optional secret env vars that kfp-kubernetes
2.15+ writes; a required one stops the pod on 2.5.0 when a key is missing). Retry policies are compiled into
both: 2.5.0 honours them only on root-level tasks, so there a failed training pod is not retried by itself
(retry the run from the UI: it resumes from the checkpoints in the work prefix).
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from blendsign.errors import ConfigError

log = logging.getLogger(__name__)

Version = tuple[int, int, int]
NEWEST_CHECKED: Version = (2, 17, 0)  # the newest backend whose compiler and driver were read (docs/pipeline.md)


@dataclass(frozen=True)
class Variant:
    name: str
    minimum: Version  # the oldest backend that runs it
    fan_in: bool  # fold models as dsl.Collected artifacts (else: read from the run's work prefix)
    display_names: bool  # task and loop display names
    exit_status: bool  # the exit handler takes dsl.PipelineTaskFinalStatus


VARIANTS = {
    "current": Variant("current", (2, 16, 0), fan_in=True, display_names=True, exit_status=True),
    "compat": Variant("compat", (2, 5, 0), fan_in=False, display_names=False, exit_status=False),
}
DEFAULT_VARIANT = "current"


def text(version: Version) -> str:
    return ".".join(map(str, version))


def parse_version(tag: str) -> Version:
    """``2.5.0``, ``v2.17.0``, ``2.14.3-rc.1`` → (major, minor, patch); anything else is an error."""
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", tag.strip())
    if not m:
        raise ConfigError(f"cannot read a Kubeflow Pipelines version from {tag!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def variant_for(version: Version) -> Variant:
    """The newest variant ``version`` runs; an error naming both versions below the oldest supported."""
    for variant in sorted(VARIANTS.values(), key=lambda v: v.minimum, reverse=True):
        if version >= variant.minimum:
            return variant
    oldest = min(v.minimum for v in VARIANTS.values())
    raise ConfigError(f"the Kubeflow Pipelines backend is version {text(version)}; blendsign's pipeline needs "
                     f"{text(oldest)} or newer (the Kubeflow 1.10 platform ships 2.5.0)")


def check_variant(variant: Variant, version: Version) -> None:
    """Refuse to send ``variant`` to a backend older than it needs, naming both versions."""
    if version < variant.minimum:
        better = variant_for(version)
        raise ConfigError(f"the Kubeflow Pipelines backend is version {text(version)}; the {variant.name!r} "
                         f"pipeline needs {text(variant.minimum)} or newer: compile or submit with "
                         f"--backend {better.name}")
    if version[:2] > NEWEST_CHECKED[:2]:
        log.warning("the Kubeflow Pipelines backend is version %s, newer than the newest checked (%s)",
                    text(version), text(NEWEST_CHECKED))


def server_version(host: str, *, headers: dict[str, str] | None = None, timeout: float = 15.0) -> Version:
    """The backend's version from its health endpoint (``GET /apis/v2beta1/healthz``, field ``tag_name``; the
    kfp SDK's ``get_kfp_healthz`` drops that field)."""
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: dict[str, Any] = json.loads(response.read() or b"{}")
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot ask the Kubeflow Pipelines server at {host} for its version ({url}: {exc})") \
            from None
    tag = body.get("tag_name") or body.get("tagName")
    if not tag:
        raise ConfigError(f"the Kubeflow Pipelines server at {host} did not say its version ({url} has no tag_name)")
    return parse_version(str(tag))


# --- what a compiled spec needs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    name: str
    breaks_before: Version  # older backends reject the run or fail it at run time
    why: str


FEATURES = (
    Feature("artifact fan-in (dsl.Collected)", (2, 14, 0), "2.5.0's driver cannot resolve it (panics)"),
    Feature("parameter fan-in (dsl.Collected)", (2, 14, 0), "2.5.0's driver cannot resolve it"),
    Feature("fan-in from a named loop", (2, 16, 0), "2.14/2.15 look the loop up by display name"),
    Feature("outputs of a renamed task", (2, 14, 0), "2.5.0 stores the display name as the task's name"),
    Feature("exit status (PipelineTaskFinalStatus)", (2, 14, 0), "2.5.0's compiler rejects the run"),
    Feature("optional secret env vars", (2, 15, 0), "2.14.x rejects the run; 2.5.0 drops optional"),
    Feature("required secret env vars", (99, 0, 0), "a missing key stops the pod (2.5.0); 2.14.x rejects the run"),
)


def _tasks(dag: dict[str, Any], components: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key, task) of every task, nested DAGs (conditions, loops, exit handlers) included."""
    out = []
    for key, task in dag.get("tasks", {}).items():
        out.append((key, task))
        inner = components[task["componentRef"]["name"]].get("dag")
        if inner:
            out += _tasks(inner, components)
    return out


def features_used(spec: dict[str, Any], platform: dict[str, Any] | None) -> list[Feature]:
    """The features of :data:`FEATURES` that a compiled pipeline (its two YAML documents) uses."""
    used: set[str] = set()
    components = spec["components"]
    tasks = _tasks(spec["root"]["dag"], components)
    renamed = {key for key, task in tasks if task["taskInfo"]["name"] != key}
    for key, task in tasks:
        if "parameterIterator" in task or "artifactIterator" in task:  # a loop: does anything fan in from it?
            outputs = components[task["componentRef"]["name"]]["dag"].get("outputs", {})
            for kind, label in (("artifacts", "artifact"), ("parameters", "parameter")):
                if outputs.get(kind):
                    used.add(f"{label} fan-in (dsl.Collected)")
                    if key in renamed:
                        used.add("fan-in from a named loop")
        inputs = task.get("inputs", {})
        producers = [i.get("taskOutputArtifact", {}).get("producerTask") for i in inputs.get("artifacts", {}).values()]
        producers += [i.get("taskOutputParameter", {}).get("producerTask")
                      for i in inputs.get("parameters", {}).values()]
        if any(p in renamed for p in producers if p):
            used.add("outputs of a renamed task")
    for comp in components.values():
        for param in comp.get("inputDefinitions", {}).get("parameters", {}).values():
            if param.get("parameterType") == "TASK_FINAL_STATUS":
                used.add("exit status (PipelineTaskFinalStatus)")
    executors = (platform or {}).get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}) \
        .get("executors", {})
    for config in executors.values():
        for env in config.get("secretAsEnv", []):
            used.add("optional secret env vars" if env.get("optional") else "required secret env vars")
    return [f for f in FEATURES if f.name in used]


def minimum_backend(spec: dict[str, Any], platform: dict[str, Any] | None) -> Version:
    """The oldest backend that runs a compiled pipeline, from the features it uses."""
    return max([(2, 5, 0), *(f.breaks_before for f in features_used(spec, platform))])
