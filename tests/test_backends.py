"""blendsign.pipelines.backends: which backend runs which variant, the server's version, a spec's features."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from blendsign.pipelines.backends import (
    VARIANTS,
    check_variant,
    features_used,
    minimum_backend,
    parse_version,
    server_version,
    variant_for,
)


def test_versions_and_variants() -> None:
    assert parse_version("2.5.0") == (2, 5, 0) and parse_version("v2.17.0") == (2, 17, 0)
    assert parse_version("2.14.3-rc.1") == (2, 14, 3) and parse_version("2.16") == (2, 16, 0)
    with pytest.raises(ValueError, match="cannot read a Kubeflow Pipelines version from 'dev'"):
        parse_version("dev")
    assert variant_for((2, 17, 0)).name == variant_for((2, 16, 0)).name == "current"
    assert variant_for((2, 15, 9)).name == variant_for((2, 5, 0)).name == "compat"  # Kubeflow 1.10: 2.5.0
    with pytest.raises(ValueError, match=r"backend is version 2\.4\.1; blendsign's pipeline needs 2\.5\.0 or newer"):
        variant_for((2, 4, 1))
    check_variant(VARIANTS["compat"], (2, 17, 0))  # the compat spec runs on new backends too
    with pytest.raises(ValueError, match=r"2\.14\.0; the 'current' pipeline needs 2\.16\.0 .* --backend compat"):
        check_variant(VARIANTS["current"], (2, 14, 0))


def _spec(loop_name: str, *, fan_in: bool, renamed_producer: bool = False, status: bool = False) -> dict[str, Any]:
    """A hand-made compiled spec: a loop over a list, a consumer after it, an exit task."""
    loop_outputs = {"artifacts": {"pipelinechannel--train-model": {"artifactSelectors": [
        {"outputArtifactKey": "model", "producerSubtask": "train"}]}}} if fan_in else {}
    return {
        "root": {"dag": {"tasks": {
            "jobs": {"componentRef": {"name": "comp-jobs"}, "taskInfo": {"name": "jobs-renamed" if renamed_producer
                                                                           else "jobs"}},
            "for-loop-2": {"componentRef": {"name": "comp-for-loop-2"}, "taskInfo": {"name": loop_name},
                           "parameterIterator": {"items": {"inputParameter": "pipelinechannel--jobs-Output"}}},
            "evaluate": {"componentRef": {"name": "comp-evaluate"}, "taskInfo": {"name": "evaluate"},
                         "inputs": {"parameters": {"n": {"taskOutputParameter": {"producerTask": "jobs",
                                                                                 "outputParameterKey": "Output"}}}}},
        }}},
        "components": {
            "comp-jobs": {}, "comp-evaluate": {"inputDefinitions": {"parameters": {
                "status": {"parameterType": "TASK_FINAL_STATUS"}} if status else {}}},
            "comp-for-loop-2": {"dag": {"tasks": {"train": {"componentRef": {"name": "comp-train"},
                                                            "taskInfo": {"name": "train"}}},
                                        "outputs": loop_outputs}},
            "comp-train": {},
        },
    }


def test_features_of_a_spec_in_closed_form() -> None:
    assert features_used(_spec("for-loop-2", fan_in=False), None) == []
    assert minimum_backend(_spec("for-loop-2", fan_in=False), None) == (2, 5, 0)
    assert [f.name for f in features_used(_spec("for-loop-2", fan_in=True), None)] == [
        "artifact fan-in (dsl.Collected)"]
    assert minimum_backend(_spec("for-loop-2", fan_in=True), None) == (2, 14, 0)
    named = features_used(_spec("training jobs", fan_in=True), None)
    assert {f.name for f in named} == {"artifact fan-in (dsl.Collected)", "fan-in from a named loop"}
    assert minimum_backend(_spec("training jobs", fan_in=True), None) == (2, 16, 0)
    assert {f.name for f in features_used(_spec("for-loop-2", fan_in=False, renamed_producer=True,
                                                 status=True), None)} == {
        "outputs of a renamed task", "exit status (PipelineTaskFinalStatus)"}
    env = {"platforms": {"kubernetes": {"deploymentSpec": {"executors": {"exec-x": {"secretAsEnv": [
        {"optional": True, "keyToEnv": []}]}}}}}}
    assert minimum_backend(_spec("for-loop-2", fan_in=False), env) == (2, 15, 0)
    env["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-x"]["secretAsEnv"][0]["optional"] = False
    assert minimum_backend(_spec("for-loop-2", fan_in=False), env) > (2, 17, 0)  # no backend runs it safely


class _Health(BaseHTTPRequestHandler):
    reply: ClassVar[tuple[int, bytes]] = (200, b"{}")
    headers_seen: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:
        self.headers_seen.append(dict(self.headers))
        status, body = self.reply
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_server_says_its_version(health: str) -> None:
    _Health.reply = (200, json.dumps({"commit_sha": "4a3592cb2d", "tag_name": "2.5.0", "multi_user": True}).encode())
    assert server_version(health, headers={"Authorization": "Bearer t0ken"}) == (2, 5, 0)
    assert _Health.headers_seen[-1]["Authorization"] == "Bearer t0ken"
    _Health.reply = (200, b'{"multi_user": false}')
    with pytest.raises(ValueError, match="did not say its version"):
        server_version(health)
    _Health.reply = (503, b"down")
    with pytest.raises(ValueError, match="cannot ask the Kubeflow Pipelines server"):
        server_version(health)
    with pytest.raises(ValueError, match="cannot ask"):
        server_version("http://127.0.0.1:9", timeout=2)  # nothing listens there
