"""Serving the champion on KServe: a ServingRuntime that runs ``blendsign serve`` and an InferenceService.

KServe cannot resolve ``models:/blendsign@champion``: its storage initializer downloads a storage URI (``s3://…``)
to ``/mnt/models``. :func:`storage_uri` asks the registry where the alias's version lies; :func:`render` puts it,
the image and the deployment's settings into the manifests of ``kserve.yaml`` (package data), which
:func:`build_manifests` makes from the ``kserve`` Python SDK's own model classes, so the field names and nesting
are KServe's (``python -m blendsign.deploy`` in an environment with ``kserve`` installed rewrites the file; a
slow test checks it is current). The manifests carry what a 40-slice scan needs: a request-body limit of 192 MiB
(the server's, and ingress-nginx's ``proxy-body-size``, whose default is 1 MiB), a 300 s request timeout (the
InferenceService's and the server's), readiness on ``/health``, one GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from blendsign.errors import ConfigError
from blendsign.model_server import ServerSettings

TEMPLATE = Path(__file__).with_name("kserve.yaml")
MODEL_FORMAT = "blendsign-mlflow"  # what the InferenceService asks for and the ServingRuntime serves
PORT = 8080
PLACEHOLDER_IMAGE = "IMAGE"
PLACEHOLDER_STORAGE = "s3://BUCKET/PATH/TO/MODEL"
KSERVE_SDK = "kserve==0.21.0"  # the SDK kserve.yaml was written with (tests/test_deploy.py rebuilds it with this)


def build_manifests(*, image: str = PLACEHOLDER_IMAGE, storage: str = PLACEHOLDER_STORAGE, name: str = "blendsign",
                    gpus: int = 1, settings: ServerSettings | None = None) -> list[dict[str, Any]]:
    """The ServingRuntime and the InferenceService as KServe's SDK builds them (needs ``pip install kserve``)."""
    import kserve
    from kubernetes import client as k8s

    settings = settings or ServerSettings()
    env = [k8s.V1EnvVar(name="BLENDSIGN_MAX_REQUEST_BYTES", value=str(settings.max_bytes)),
           k8s.V1EnvVar(name="BLENDSIGN_REQUEST_TIMEOUT", value=str(settings.timeout))]
    probe = k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path="/health", port=PORT), period_seconds=10,
                        failure_threshold=3)
    container = k8s.V1Container(
        name="kserve-container", image=image,
        command=["blendsign", "serve", "/mnt/models", "--host", "0.0.0.0", "--port", str(PORT)],
        env=env, ports=[k8s.V1ContainerPort(container_port=PORT, protocol="TCP")], readiness_probe=probe,
        resources=k8s.V1ResourceRequirements(requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "8Gi"}))
    runtime = kserve.V1alpha1ServingRuntime(
        api_version="serving.kserve.io/v1alpha1", kind="ServingRuntime",
        metadata=k8s.V1ObjectMeta(name=name),
        spec=kserve.V1alpha1ServingRuntimeSpec(
            supported_model_formats=[kserve.V1alpha1SupportedModelFormat(name=MODEL_FORMAT, version="1",
                                                                         auto_select=True)],
            containers=[container]))
    resources = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    body_limit = f"{settings.max_bytes // (1 << 20)}m"
    isvc = kserve.V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1", kind="InferenceService",
        metadata=k8s.V1ObjectMeta(name=name, annotations={"nginx.ingress.kubernetes.io/proxy-body-size": body_limit}),
        spec=kserve.V1beta1InferenceServiceSpec(predictor=kserve.V1beta1PredictorSpec(
            min_replicas=1, timeout=settings.timeout, container_concurrency=2,
            model=kserve.V1beta1ModelSpec(
                name="kserve-container", model_format=kserve.V1beta1ModelFormat(name=MODEL_FORMAT, version="1"),
                runtime=name,
                storage_uri=storage, resources=k8s.V1ResourceRequirements(**resources)))))
    api = kserve.ApiClient()
    return [api.sanitize_for_serialization(runtime), api.sanitize_for_serialization(isvc)]


def direct_uri(uri: str, artifacts_destination: str | None) -> str:
    """``mlflow-artifacts:/<path>`` → ``<artifacts_destination>/<path>``; any other URI as it is."""
    if uri.startswith("mlflow-artifacts:") and artifacts_destination:
        path = urlsplit(uri).path.lstrip("/")  # mlflow-artifacts:/<path> or mlflow-artifacts://host:port/<path>
        return f"{artifacts_destination.rstrip('/')}/{path}"
    return uri


def storage_uri(client: Any, name: str, alias: str = "champion", *,
                artifacts_destination: str | None = None) -> tuple[str, str]:
    """(version, storage URI of its model folder) of ``models:/name@alias``: what KServe downloads.

    A server that proxies artifacts (``mlflow server --serve-artifacts``) names them ``mlflow-artifacts:/…``;
    ``artifacts_destination`` (the server's ``--artifacts-destination``, e.g. ``s3://bucket/mlflow``) maps them
    to the bucket KServe reads.
    """
    version = str(client.get_model_version_by_alias(name, alias).version)
    uri = direct_uri(str(client.get_model_version_download_uri(name, version)), artifacts_destination)
    if not uri.startswith(("s3://", "gs://", "https://", "http://", "hdfs://", "pvc://", "oci://")):
        raise ConfigError(f"{name} v{version} lies at {uri}, which KServe's storage initializer cannot fetch: use an "
                         "MLflow artifact store on S3 (mlflow/README.md), and for a server that proxies artifacts "
                         "pass its --artifacts-destination")
    return version, uri


def render(storage: str, *, image: str, name: str = "blendsign", namespace: str | None = None, gpus: int = 1,
           service_account: str | None = None, version: str | None = None) -> str:
    """The manifests of ``kserve.yaml`` for one deployment (YAML, two documents: ``kubectl apply -f``)."""
    runtime, isvc = copy.deepcopy(list(yaml.safe_load_all(TEMPLATE.read_text())))
    for doc in (runtime, isvc):
        doc["metadata"]["name"] = name
        if namespace:
            doc["metadata"]["namespace"] = namespace
    runtime["spec"]["containers"][0]["image"] = image
    predictor = isvc["spec"]["predictor"]
    predictor["model"]["runtime"] = name
    predictor["model"]["storageUri"] = storage
    limits = predictor["model"]["resources"]["limits"]
    limits.pop("nvidia.com/gpu", None)
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    if service_account:  # the account whose secret lets the storage initializer read the bucket
        predictor["serviceAccountName"] = service_account
    if version:
        isvc["metadata"].setdefault("labels", {})["blendsign/model-version"] = version
    return yaml.safe_dump_all([runtime, isvc], sort_keys=False)


def main() -> None:
    """Rewrite ``kserve.yaml`` from the SDK's classes (run where ``kserve`` is installed)."""
    TEMPLATE.write_text(template_text())


def template_text() -> str:
    """What ``kserve.yaml`` holds: :func:`build_manifests` with placeholders, as YAML."""
    return (f"# Written by `python -m blendsign.deploy` from the kserve SDK's model classes ({KSERVE_SDK}); "
            "`blendsign registry deploy` fills in the values.\n"
            + yaml.safe_dump_all(build_manifests(), sort_keys=False))


if __name__ == "__main__":
    main()
