"""HTTP serving: MLflow's scoring server behind a guard (``blendsign serve``), and a local server for tests.

``blendsign serve MODEL`` is what the image runs and what the KServe ServingRuntime starts (docs/serving.md): MLflow's
own scoring app (``POST /invocations`` with MLflow's JSON and CSV protocol, ``GET /ping``, ``/version``) inside
:class:`Guard`, which

- refuses a body over ``max_bytes`` with 413 before reading it whole (a Content-Length over the limit at once);
- answers every error with ``{"error_code", "message"}`` whose message is the model's own
  :class:`blendsign.serving.RequestError` text or a fixed one, never the request's content: MLflow's messages
  quote the request (a DICOM posted as JSON or CSV came back whole in the 400, patient name included);
- answers ``GET /health`` with 200 and the model's device once its networks are loaded, 503 before;
- stops a request after ``timeout`` seconds (504).

It runs in process (uvicorn's Python API), so it needs no ``uvicorn`` on ``PATH`` as ``mlflow models serve`` does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blendsign.errors import ConfigError

log = logging.getLogger(__name__)  # (blendsign.serving, torch and MLflow are imported where they are used:
# blendsign.deploy reads ServerSettings in an environment that has only the kserve SDK)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MiB = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    """Limits of the HTTP front. A 40-slice scan as JSON (base64) is about 27 MiB; the defaults take 256 slices.

    ``max_bytes`` (``BLENDSIGN_MAX_REQUEST_BYTES``): request body limit; ``timeout`` (``BLENDSIGN_REQUEST_TIMEOUT``):
    seconds per request (MLflow's default of 60 s cuts off a 40-slice scan on a CPU).
    """

    max_bytes: int = 192 * MiB
    timeout: int = 300

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None) -> ServerSettings:
        env = os.environ if env is None else env
        values = {}
        for name, var in (("max_bytes", "BLENDSIGN_MAX_REQUEST_BYTES"), ("timeout", "BLENDSIGN_REQUEST_TIMEOUT")):
            if env.get(var):
                try:
                    values[name] = int(env[var])
                except ValueError:
                    raise ConfigError(f"{var} must be an integer, got {env[var]!r}") from None
        return cls(**values)


ERROR_CODES = {400: "BAD_REQUEST", 404: "ENDPOINT_NOT_FOUND", 405: "ENDPOINT_NOT_FOUND", 413: "REQUEST_LIMIT_EXCEEDED",
               415: "BAD_REQUEST", 503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
PROTOCOL = ('JSON {"dataframe_split": {"columns": ["dicom"], "data": [["<base64 DICOM>"], …]}} (or '
            '"dataframe_records"), or CSV with a dicom column, UTF-8')


def error_message(status: int, settings: ServerSettings, model_errors: list[str]) -> str:
    """The text of an error response: the model's own request error, or a fixed text for ``status``."""
    if model_errors:
        return model_errors[0]
    if status == 400:
        return f"the request cannot be scored: send {PROTOCOL}; the request's content is not repeated here"
    if status in (404, 405):
        return "no such endpoint: POST /invocations, GET /ping, /health, /version"
    if status == 413:
        return (f"request body over {settings.max_bytes} bytes (BLENDSIGN_MAX_REQUEST_BYTES): send fewer slices "
                "per request")
    if status == 415:
        return f"unsupported content type or charset: send {PROTOCOL}"
    if status == 504:
        return (f"scoring took longer than {settings.timeout} s (BLENDSIGN_REQUEST_TIMEOUT): send fewer slices per "
                "request, or serve on a GPU")
    return f"the request could not be scored (HTTP {status}); the server's log has the reason"


async def _respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware around MLflow's scoring app: body limit, error responses without request content, /health."""

    def __init__(self, app: App, settings: ServerSettings, health: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        self.app, self.settings, self.health = app, settings, health

    async def _error(self, send: Send, status: int, errors: list[str]) -> None:
        message = error_message(status, self.settings, errors)
        log.warning("request refused: HTTP %d: %s", status, message)
        await _respond(send, status, {"error_code": ERROR_CODES.get(status, "INTERNAL_ERROR"), "message": message})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/health" and scope["method"] == "GET":
            status, payload = self.health()
            await _respond(send, status, payload)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.settings.max_bytes:
            await self._error(send, 413, [])
            return
        body = bytearray()
        while True:  # read the body within the limit (a chunked request declares no length)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.settings.max_bytes:
                await self._error(send, 413, [])
                return
            if not message.get("more_body", False):
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        from blendsign.serving import REQUEST_ERRORS

        errors: list[str] = []
        status = 0

        async def guarded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status < 400:
                    await send(message)
            elif message["type"] == "http.response.body" and status >= 400:
                if not message.get("more_body", False):  # the inner body (possibly the request) is dropped
                    await self._error(send, status, errors)
            else:
                await send(message)

        token = REQUEST_ERRORS.set(errors)  # the model's RequestError messages land here (copied contexts share it)
        try:
            await self.app(scope, replay, guarded)
        finally:
            REQUEST_ERRORS.reset(token)


def guarded_app(model: Any, settings: ServerSettings) -> Guard:
    """MLflow's scoring app for the loaded pyfunc ``model`` inside :class:`Guard`."""
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(settings.timeout)  # read by init()
    from mlflow.pyfunc import scoring_server

    inner = model.unwrap_python_model()

    def health() -> tuple[int, dict[str, Any]]:
        device = getattr(inner, "device", None)
        if device is None:
            return 503, {"status": "loading", "message": "the model's networks are not loaded"}
        return 200, {"status": "ready", "device": str(device), "max_rows": inner.settings.max_rows,
                     "max_bytes": settings.max_bytes, "model": model.metadata.metadata or {}}

    return Guard(scoring_server.init(model), settings, health)


def serve(model_uri: str, *, host: str, port: int, settings: ServerSettings, model_config: dict[str, Any],
          tracking_uri: str | None = None) -> None:
    """Load ``model_uri`` (a ``models:/`` URI, or a local folder such as KServe's ``/mnt/models``) and serve it."""
    import uvicorn

    from blendsign.model_package import load
    from blendsign.serving import ServeSettings

    ServeSettings.resolve(model_config)  # bad settings fail before the model is fetched
    model = load(model_uri, tracking_uri=tracking_uri, model_config=model_config)
    log.info("serving on http://%s:%d: POST /invocations, GET /health; bodies up to %d bytes, %d s per request",
             host, port, settings.max_bytes, settings.timeout)
    uvicorn.run(guarded_app(model, settings), host=host, port=port, log_level="info")


@contextmanager
def model_server(model_uri: str, *, tracking_uri: str, log: str | Path, timeout: int = 600, startup: float = 180.0,
                 guarded: bool = False, env: dict[str, str] | None = None) -> Iterator[str]:
    """A model server of ``model_uri`` on 127.0.0.1 (a free port) for the block; yields its base URL.

    ``guarded``: ``blendsign serve`` (:func:`serve`); else ``mlflow models serve --env-manager local``, with the
    environment's ``bin`` on ``PATH`` (it execs ``uvicorn``). The request timeout is ``timeout`` seconds; ``env``
    is added to the server's environment; output goes to ``log``. The server runs in its own process group (not
    its own session: that would give it its own CPU autogroup, a larger share of a busy machine) and the whole
    group is stopped on exit. ``RuntimeError`` with the log's tail if it exits or is not up within ``startup``
    seconds.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = Path(log)
    environ = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **(env or {}),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if guarded:
        environ["BLENDSIGN_REQUEST_TIMEOUT"] = str(timeout)
        command = [sys.executable, "-m", "blendsign.cli", "serve", model_uri, "--host", "127.0.0.1",
                   "--port", str(port)]
    else:
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                   "--host", "127.0.0.1", "-p", str(port), "--timeout", str(timeout)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=environ, stdout=out, stderr=subprocess.STDOUT, process_group=0,
                                cwd=log.parent)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"model server exited ({proc.returncode}): {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"model server not up in {startup:.0f} s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
