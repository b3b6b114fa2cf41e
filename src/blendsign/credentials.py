"""A Kubeflow task's credentials: the keys of one Kubernetes secret, mounted as files, exported as environment
variables before a pipeline step runs.

The secret is mounted as a volume (``secretAsVolume``, every backend from 2.5.0 on) rather than as env vars:
an env var taken from a missing key stops the pod on backends before 2.15.0, and 2.14.x rejects the optional
form outright. A mounted secret simply lacks the file of a key it does not hold. Values are never logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

DIR_ENV = "BLENDSIGN_CREDENTIALS_DIR"  # where the compiled pipeline mounts the secret
KEYS = (
    "AWS_ACCESS_KEY_ID",  # S3: data prefixes, the run's work prefix and the MLflow artifact store
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",  # S3-compatible store (MinIO, Ceph); absent for AWS itself
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",  # used when the tracking_uri parameter is empty
    "MLFLOW_TRACKING_USERNAME",  # MLflow server with basic auth
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_INSECURE_TLS",  # an MLflow server behind a self-signed certificate ...
    "MLFLOW_TRACKING_SERVER_CERT_PATH",  # ... or an internal CA (a path: e.g. another key of this secret)
    "MLFLOW_ARTIFACT_ROOT",  # where new experiments put their artifacts (e.g. s3://bucket/mlflow)
    "BLENDSIGN_ARTIFACT_ROOT",
    "BLENDSIGN_PSEUDONYM_KEY",  # de-identification key: the same for every run, never stored with the data
)
"""The keys read from the secret, each exported as the environment variable of the same name."""


def load(folder: str | Path | None = None) -> list[str]:
    """Export the known keys found in ``folder`` (default ``$BLENDSIGN_CREDENTIALS_DIR``; unset: nothing to do)
    that the environment does not set already; returns their names. Other files are ignored, by name."""
    folder = folder or os.environ.get(DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return []
    loaded, ignored = [], []
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # Kubernetes' ..data links and timestamped folders
        if path.name not in KEYS:
            ignored.append(path.name)
            continue
        value = path.read_text().strip()
        if value and not os.environ.get(path.name):
            os.environ[path.name] = value
            loaded.append(path.name)
    log.info("credentials from %s: %s%s", folder, ", ".join(loaded) or "none",
             f" (ignored keys: {', '.join(ignored)})" if ignored else "")
    return loaded


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set environment variables for the block (``None``: leave it as it is), then restore them; subprocesses
    started inside inherit them."""
    old = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is not None:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
