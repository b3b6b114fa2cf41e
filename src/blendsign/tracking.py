"""The only module that talks to MLflow: an explicit client, no global experiment or active run.

``MLFLOW_TRACKING_URI`` is respected; without it the store is SQLite in ``.blendsign/mlflow.db`` with
artifacts in ``.blendsign/mlartifacts``, both inside the working directory, created on first use.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blendsign.config import TrackingConfig
from blendsign.errors import ConfigError

log = logging.getLogger(__name__)

LOCAL_DIR = Path(".blendsign")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(LOCAL_DIR / 'mlflow.db').resolve()}"


def existing_store(purpose: str) -> str:
    """``$MLFLOW_TRACKING_URI``, else this folder's ``.blendsign/mlflow.db`` if it exists: never a new, empty store
    (a command that reads models, run outside the checkout, would otherwise find nothing and not say why)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = LOCAL_DIR / "mlflow.db"
    if db.is_file():
        return f"sqlite:///{db.resolve()}"
    raise FileNotFoundError(
        f"no MLflow store {purpose}: MLFLOW_TRACKING_URI is not set and {db.resolve()} does not exist. Set "
        "MLFLOW_TRACKING_URI (the tracking server, or sqlite:////path/to/checkout/.blendsign/mlflow.db), pass "
        "--tracking-uri, or pass a downloaded model folder as --model")


def display_uri(uri: str) -> str:
    """``uri`` without a ``user:password@`` part, for logs and reports."""
    return re.sub(r"^(\w+://)[^/@]+@", r"\1", uri)


def ui_command(uri: str) -> str:
    """How to browse ``uri``: ``make mlflow-ui`` in a checkout whose own store it is, else the mlflow command."""
    own = f"sqlite:///{(LOCAL_DIR / 'mlflow.db').resolve()}"
    if uri == own and Path("Makefile").is_file() and "mlflow-ui:" in Path("Makefile").read_text():
        return "make mlflow-ui"
    if uri.startswith(("http://", "https://")):
        return f"open {display_uri(uri)} (the tracking server is the UI)"
    return f"mlflow ui --host 127.0.0.1 --backend-store-uri {uri}"


MIN_SERVER_MAJOR = 3  # logged models (``log_model(name=...)``, /api/2.0/mlflow/logged-models) exist from MLflow 3


_SERVER_VERSIONS: dict[str, str] = {}


def check_server_version(uri: str) -> str | None:
    """The MLflow server's version (``GET <uri>/version``), checked once per process and URI.

    ``None`` for a store that is not a server (SQLite, files) or a server whose version cannot be read (a warning
    says so; the client's own calls then tell whether it works). Raises ``ValueError`` for a server older than
    MLflow 3, naming both versions: a 2.x server answers 404 to the logged-model calls, after hours of training.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    if uri in _SERVER_VERSIONS:
        return _SERVER_VERSIONS[uri]
    import requests
    from packaging.version import InvalidVersion, Version

    auth = None
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    try:
        resp = requests.get(f"{uri.rstrip('/')}/version", auth=auth, headers=headers, timeout=10,
                            verify=not insecure)
        resp.raise_for_status()
        text = resp.text.strip()
        server = Version(text)
    except (requests.RequestException, InvalidVersion) as exc:
        log.warning("MLflow server %s: cannot read its version (%s)", display_uri(uri), type(exc).__name__)
        return None  # not remembered: asked again next time
    from mlflow.version import VERSION

    if server.major < MIN_SERVER_MAJOR:
        raise ConfigError(f"the MLflow server at {display_uri(uri)} runs MLflow {text}; blendsign (MLflow client "
                         f"{VERSION}) needs a server of MLflow {MIN_SERVER_MAJOR} or newer (it logs models with "
                         "MLflow 3's logged-model API, which a 2.x server answers with 404): upgrade the server "
                         "(mlflow/README.md)")
    log.info("MLflow server %s: MLflow %s (client %s)", display_uri(uri), text, VERSION)
    _SERVER_VERSIONS[uri] = text
    return text


COMMIT_ENV = "BLENDSIGN_GIT_COMMIT"  # baked into the images at build time (docker/)
IMAGE_ENV = "BLENDSIGN_IMAGE_REF"  # the image a Kubeflow task runs in, as the compiled pipeline names it


def git_commit() -> str:
    """The source tree's commit: ``$BLENDSIGN_GIT_COMMIT`` (an image), else the git checkout's, else ``unknown``."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, str]:
    """What every MLflow run records about the code that made it: the commit, and the image when in one."""
    image = os.environ.get(IMAGE_ENV)
    return {"git_commit": git_commit(), **({"image": image} if image else {})}


@dataclass
class Run:
    """One MLflow run, written through an explicit client."""

    client: Any  # mlflow.MlflowClient
    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


@dataclass
class Tracker:
    """An MLflow store and experiment; runs are opened explicitly with ``run``."""

    client: Any
    experiment_id: str
    uri: str
    experiment_name: str
    tags: Mapping[str, str] = field(default_factory=dict)  # set on every run this tracker opens

    @classmethod
    def open(cls, experiment: str | None = None, uri: str | None = None,
             tags: Mapping[str, str] | None = None) -> Tracker:
        """``experiment``: default the config's (``tracking.experiment``)."""
        from mlflow import MlflowClient

        experiment = experiment or TrackingConfig().experiment
        uri = uri or tracking_uri()
        check_server_version(uri)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            # BLENDSIGN_ARTIFACT_ROOT / MLFLOW_ARTIFACT_ROOT (e.g. s3://bucket/mlflow): new experiments put
            # their artifacts under <root>/<experiment> (MLflow itself reads neither variable client-side).
            root_env = os.environ.get("BLENDSIGN_ARTIFACT_ROOT") or os.environ.get("MLFLOW_ARTIFACT_ROOT")
            location = None
            if root_env:
                location = f"{root_env.rstrip('/')}/{experiment}"
            elif uri.startswith("sqlite:"):
                root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
                location = root.resolve().as_uri()
            exp_id = client.create_experiment(experiment, artifact_location=location)
        log.info("MLflow: %s, experiment %r", display_uri(uri), experiment)
        return cls(client, exp_id, uri, experiment, dict(tags or {}))

    @contextmanager
    def run(
        self,
        name: str,
        *,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
    ) -> Iterator[Run]:
        """Open (or, with ``run_id``, resume) a run; it ends FINISHED, or FAILED on an exception."""
        all_tags = {**provenance(), **self.tags, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is None:
            created = self.client.create_run(self.experiment_id, run_name=name,
                                             tags={k: str(v) for k, v in all_tags.items()})
            run = Run(self.client, created.info.run_id)
        else:
            run = Run(self.client, run_id)
            self.client.update_run(run_id, status="RUNNING")
            if parent_run_id:  # resumed by a new parent (a re-run of cross-validation): it moves there
                self.client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
            run.set_tags(self.tags)  # ... and belongs to the pipeline run that resumed it
        try:
            yield run
        except BaseException:
            run.end("FAILED")
            raise
        run.end("FINISHED")


def finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drop NaN/inf values (e.g. AUC of a class absent from a fold) before logging."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
