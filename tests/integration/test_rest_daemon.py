"""OIP v2 over HTTP/REST on the real daemon learning feature events from the real broker.

curl-style JSON and the unmodified ``tritonclient.http`` get the right label; after a new class
creates a newer version, the older one still answers when a request pins it.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as tch
from kafka import KafkaProducer

from service.core.events import encode
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as eddy_pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as eddy_grpc
from tests.integration.daemon import DaemonProc, daemon_env, start_daemon
from tests.integration.streams import DIM, class_centers
from tests.service.rest_fixtures import call

pytestmark = pytest.mark.kafka
SEED = 11


def _events(label: int, n: int, *, seed: int) -> list[bytes]:
    rng = np.random.default_rng([seed, label])
    center = class_centers(4, SEED)[label]
    rows = (center + 0.3 * rng.normal(size=(n, DIM)) / np.sqrt(DIM)).astype(np.float32)
    return [encode(f"e-{seed}-{label}-{i}", f"class-{label:02d}", features=row.tolist()) for i, row in enumerate(rows)]


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for value in values:
        producer.send(topic, value)
    producer.flush()
    producer.close()


def _infer(daemon: DaemonProc, rows: np.ndarray, version: str | None = None) -> tuple[int, Any]:
    path = f"/v2/models/eddy/versions/{version}/infer" if version else "/v2/models/eddy/infer"
    body = {"inputs": [{"name": "FEATURES", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}]}
    return call(daemon.http + path, body, headers={"Content-Type": "application/json"})


def _wait_label(daemon: DaemonProc, row: np.ndarray, label: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        status, body = _infer(daemon, row[None, :])
        if status == 200 and body["outputs"][0]["data"] == [label]:
            return body
        time.sleep(0.1)
    raise AssertionError(f"no model answered {label} (last {body}):\n{daemon.log()[-3000:]}")


def test_rest_on_a_learning_daemon_with_version_pinning(kafka_bootstrap, topic_name, tmp_path):
    centers = class_centers(4, SEED).astype(np.float32)
    _produce(kafka_bootstrap, topic_name, [v for c in range(3) for v in _events(c, 60, seed=1)])
    # Routine exports go on while the new class's events arrive (one a second); on a loaded machine
    # more than the default three versions can follow the older one before it is asked for.
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, EDDY_HEAD__EXPANSION_WIDTH="256",
                     EDDY_SERVING__VERSIONS_LOADED="10")
    daemon = start_daemon(tmp_path, env)
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 180)
        for c in range(3):
            _wait_label(daemon, centers[c], f"class-{c:02d}")
        assert call(daemon.http + "/v2/health/live")[0] == 200
        assert call(daemon.http + "/v2/models/eddy/ready")[0] == 200
        status, meta = call(daemon.http + "/v2/models/eddy")
        assert status == 200 and meta["inputs"][-1] == {"name": "FEATURES", "datatype": "FP32", "shape": [-1, DIM]}

        # curl-style JSON and tritonclient.http agree on the labels of all three classes.
        status, body = _infer(daemon, centers[:3])
        assert status == 200, body
        assert body["outputs"][0]["data"] == ["class-00", "class-01", "class-02"]
        older = body["model_version"]
        client = tch.InferenceServerClient(f"127.0.0.1:{daemon.http_port}")
        tensor = tch.InferInput("FEATURES", [3, DIM], "FP32")
        tensor.set_data_from_numpy(centers[:3])
        result = client.infer("eddy", [tensor], outputs=[tch.InferRequestedOutput("LABEL")])
        assert [b.decode() for b in result.as_numpy("LABEL").ravel()] == ["class-00", "class-01", "class-02"]

        # A new class makes a newer version; the older one, pinned, still answers without it.
        _produce(kafka_bootstrap, topic_name, _events(3, 60, seed=2))
        newer = _wait_label(daemon, centers[3], "class-03")["model_version"]
        assert int(newer) > int(older)
        status, body = _infer(daemon, centers[3:4], version=older)
        assert status == 200, (older, newer, body)
        assert body["model_version"] == older and body["outputs"][0]["data"] != ["class-03"]
        assert older in call(daemon.http + "/v2/models/eddy")[1]["versions"]
        with grpc.insecure_channel(daemon.addr) as channel:
            reply = eddy_grpc.InferenceStub(channel).Predict(eddy_pb.PredictRequest(
                features=eddy_pb.Features(values=centers[3].tolist()), model_version=int(older)))
        assert reply.model_version == int(older) and reply.predictions[0].label != "class-03"

        # Mistakes a person can fix: each names what was expected.
        status, body = call(daemon.http + "/v2/models/eddy/infer", b"{not json",
                            headers={"Content-Type": "application/json"})
        assert status == 400 and "malformed JSON" in body["error"]
        status, body = _infer(daemon, np.zeros((1, DIM - 1), np.float32))
        assert status == 400 and f"expected {DIM}" in body["error"]
        status, body = call(daemon.http + "/v2/models/nope/infer", {"inputs": []})
        assert status == 404 and "'eddy'" in body["error"]
        status, body = _infer(daemon, centers[:1], version="0")
        assert status == 404 and "loaded versions" in body["error"] and newer in body["error"]
        client.close()
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]
    assert "HTTP/REST on http://127.0.0.1" in daemon.log()
