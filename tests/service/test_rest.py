"""OIP v2 over HTTP/REST: JSON as curl sends it, the unmodified tritonclient.http client, errors, pinning."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tcg
import tritonclient.http as tch
from tritonclient.utils import InferenceServerException

from service.models.served import ModelSlot
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as eddy_pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as eddy_grpc
from tests.service.grpc_fixtures import CLASSES, D, make_readout, real_backbone, served, text_model
from tests.service.rest_fixtures import call, running_servers

X = np.random.default_rng(3).normal(size=(4, D)).astype(np.float32)
NEW = ("billing", "cards", "travel", "refunds")


@pytest.fixture
def slot() -> ModelSlot:
    slot = ModelSlot(versions_loaded=3)
    slot.swap(served(4, seed=7))
    return slot


@pytest.fixture
def urls(slot: ModelSlot) -> Iterator[tuple[str, str]]:
    with running_servers(slot) as urls:
        yield urls


def _labels(seed: int, x: np.ndarray, classes: tuple[str, ...] = CLASSES) -> list[str]:
    return [classes[j] for j in make_readout(classes, seed=seed).predict_proba(x).argmax(1)]


def _infer_body(x: np.ndarray, **extra: object) -> dict:
    return {"inputs": [{"name": "FEATURES", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}],
            **extra}


def test_health_metadata_and_ready(urls: tuple[str, str]) -> None:
    http, _ = urls
    assert call(f"{http}/v2/health/live") == (200, {"live": True})
    assert call(f"{http}/v2/health/ready") == (200, {"ready": True})
    assert call(f"{http}/v2/models/eddy/ready") == (200, {"name": "eddy", "ready": True})
    status, server = call(f"{http}/v2")
    assert status == 200 and server["name"] == "eddy" and "binary_tensor_data" in server["extensions"]
    status, model = call(f"{http}/v2/models/eddy")
    assert status == 200 and model["versions"] == ["4"]
    assert model["inputs"] == [{"name": "FEATURES", "datatype": "FP32", "shape": [-1, D]}]
    assert [o["name"] for o in model["outputs"]] == ["LABEL", "PROBABILITY", "UNKNOWN", "SCORE"]


def test_json_infer_as_curl_sends_it(urls: tuple[str, str]) -> None:
    http, _ = urls
    status, body = call(f"{http}/v2/models/eddy/infer", _infer_body(X, id="r1", parameters={"top_k": 2}))
    assert status == 200, body
    assert body["model_name"] == "eddy" and body["model_version"] == "4" and body["id"] == "r1"
    assert body["parameters"]["model_version"] == 4
    out = {o["name"]: o for o in body["outputs"]}
    assert out["LABEL"]["shape"] == [4, 2] and out["LABEL"]["datatype"] == "BYTES"
    assert out["LABEL"]["data"][::2] == _labels(7, X)
    expected = np.sort(make_readout(seed=7).predict_proba(X), axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(np.reshape(out["PROBABILITY"]["data"], (4, 2)), expected, atol=1e-5)
    # A flat list is as good as a nested one; asking for one output returns only it.
    flat = {"inputs": [{"name": "FEATURES", "shape": [4, D], "datatype": "FP32", "data": X.ravel().tolist()}],
            "outputs": [{"name": "LABEL"}]}
    status, body = call(f"{http}/v2/models/eddy/infer", flat)
    assert status == 200 and [o["name"] for o in body["outputs"]] == ["LABEL"]
    assert body["outputs"][0]["data"] == _labels(7, X)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_infer_unmodified(urls: tuple[str, str], binary: bool) -> None:
    http, _ = urls
    client = tch.InferenceServerClient(http.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("eddy")
        tensor = tch.InferInput("FEATURES", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X, binary_data=binary)
        outputs = [tch.InferRequestedOutput(n, binary_data=binary) for n in ("LABEL", "PROBABILITY")]
        result = client.infer("eddy", [tensor], outputs=outputs)
        labels = [b.decode() if isinstance(b, bytes) else b for b in result.as_numpy("LABEL").ravel()]
        assert labels == _labels(7, X)
        assert result.get_response()["model_version"] == "4"
        np.testing.assert_allclose(result.as_numpy("PROBABILITY").ravel(),
                                   make_readout(seed=7).predict_proba(X).max(1), atol=1e-5)
        assert client.get_model_metadata("eddy")["versions"] == ["4"]
    finally:
        client.close()


def test_bad_requests_get_400_404_413_with_messages(urls: tuple[str, str]) -> None:
    http, _ = urls
    infer = f"{http}/v2/models/eddy/infer"
    status, body = call(infer, b'{"inputs": [', headers={"Content-Type": "application/json"})
    assert status == 400 and "malformed JSON" in body["error"] and "FEATURES" in body["error"]
    status, body = call(infer, _infer_body(np.zeros((2, D + 1), np.float32)))
    assert status == 400 and f"expected {D}" in body["error"]
    wrong = {"inputs": [{"name": "FEATURES", "shape": [3, D], "datatype": "FP32", "data": X.tolist()}]}
    status, body = call(infer, wrong)
    assert status == 400 and f"needs {3 * D} values, got {4 * D}" in body["error"]
    status, body = call(infer, {"inputs": [{**_infer_body(X)["inputs"][0], "datatype": "INT32",
                                            "data": np.zeros((4, D), int).tolist()}]})
    assert status == 400 and "expected FP32" in body["error"]
    status, body = call(infer, {"outputs": [{"name": "LABEL"}]})
    assert status == 400 and 'missing "inputs"' in body["error"]
    status, body = call(infer, _infer_body(X, outputs=[{"name": "EMBEDDING"}]))
    assert status == 400 and "LABEL" in body["error"] and "EMBEDDING" in body["error"]
    status, body = call(infer, {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "FP32", "data": [1]}]})
    assert status == 400 and "FEATURES" in body["error"]
    status, body = call(f"{http}/v2/models/other/infer", _infer_body(X))
    assert status == 404 and "'other'" in body["error"] and "'eddy'" in body["error"]
    status, body = call(f"{http}/v2/models/other")
    assert status == 404 and "'eddy'" in body["error"]
    status, body = call(f"{http}/v1/models")
    assert status == 404 and "/v2/models/{name}/infer" in body["error"]
    status, body = call(infer, b"[" + b"0.5," * 400_000 + b"0]")
    assert status == 413 and "max_message_bytes" in body["error"]


def test_503_before_the_first_model() -> None:
    with running_servers(ModelSlot()) as (http, _):
        assert call(f"{http}/v2/health/live")[0] == 200
        assert call(f"{http}/v2/health/ready") == (503, {"ready": False})
        status, body = call(f"{http}/v2/models/eddy/infer", _infer_body(X))
        assert status == 503 and "no model" in body["error"]
        assert call(f"{http}/v2/models/eddy/ready")[0] == 503


def test_pinned_versions_over_rest_and_both_grpc_apis(slot: ModelSlot) -> None:
    slot.swap(served(5, seed=7))
    slot.swap(served(6, seed=8, classes=NEW))
    slot.swap(served(7, seed=9, classes=NEW))  # v4 drops out: three stay loaded
    assert slot.loaded_versions() == [7, 6, 5]
    with running_servers(slot) as (http, address):
        status, body = call(f"{http}/v2/models/eddy/versions/5/infer", _infer_body(X))
        assert status == 200 and body["model_version"] == "5"
        assert body["outputs"][0]["data"] == _labels(7, X)  # v5 answers: it knows no "refunds"
        status, body = call(f"{http}/v2/models/eddy/infer", _infer_body(X))
        assert body["model_version"] == "7" and body["outputs"][0]["data"] == _labels(9, X, NEW)
        status, body = call(f"{http}/v2/models/eddy/versions/4/infer", _infer_body(X))
        assert status == 404 and "loaded versions (newest first): 7, 6, 5" in body["error"]
        assert call(f"{http}/v2/models/eddy/versions/6/ready")[0] == 200
        assert call(f"{http}/v2/models/eddy/versions/4/ready")[0] == 404
        assert call(f"{http}/v2/models/eddy")[1]["versions"] == ["5", "6", "7"]
        status, body = call(f"{http}/v2/models/eddy/versions/6")
        assert status == 200 and body["versions"] == ["5", "6", "7"]

        client = tcg.InferenceServerClient(address)
        tensor = tcg.InferInput("FEATURES", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        result = client.infer("eddy", [tensor], model_version="6")
        assert result.get_response().model_version == "6"
        assert [b.decode() for b in result.as_numpy("LABEL").ravel()] == _labels(8, X, NEW)
        with pytest.raises(InferenceServerException, match="7, 6, 5"):
            client.infer("eddy", [tensor], model_version="4")
        assert client.is_model_ready("eddy", "5") and not client.is_model_ready("eddy", "4")
        client.close()

        with grpc.insecure_channel(address) as channel:
            stub = eddy_grpc.InferenceStub(channel)
            row = eddy_pb.Features(values=X[0].tolist())
            reply = stub.Predict(eddy_pb.PredictRequest(features=row, model_version=5))
            assert reply.model_version == 5 and reply.predictions[0].label == _labels(7, X[:1])[0]
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(eddy_pb.PredictRequest(features=row, model_version=4))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "7, 6, 5" in (info.value.details() or "")


def test_predict_token_guards_all_but_health(slot: ModelSlot) -> None:
    with running_servers(slot, predict_token="s3cret") as (http, _):
        assert call(f"{http}/v2/health/ready")[0] == 200
        status, body = call(f"{http}/v2/models/eddy/infer", _infer_body(X))
        assert status == 401 and "Authorization: Bearer" in body["error"]
        status, body = call(f"{http}/v2/models/eddy/infer", _infer_body(X),
                            headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and body["model_version"] == "4"


def test_https_with_the_grpc_certificate(slot: ModelSlot, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                           "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                           "-keyout", str(key), "-out", str(cert)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {made.stderr.decode()[-200:]}")
    with running_servers(slot, tls=(cert, key)) as (https, _):
        assert https.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        status, body = call(f"{https}/v2/models/eddy/infer", _infer_body(X), context=context)
        assert status == 200 and body["outputs"][0]["data"] == _labels(7, X)


def test_binary_data_and_parameter_mistakes_are_400(urls: tuple[str, str]) -> None:
    http, _ = urls
    infer = f"{http}/v2/models/eddy/infer"
    head = json.dumps({"inputs": [{"name": "FEATURES", "shape": [4, D], "datatype": "FP32",
                                   "parameters": {"binary_data_size": X.nbytes}}]}).encode()
    status, body = call(infer, head + X.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
    assert status == 200 and body["outputs"][0]["data"] == _labels(7, X)
    status, body = call(infer, head + X.tobytes()[:-4], headers={"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and f"binary_data_size {X.nbytes}" in body["error"]
    status, body = call(infer, head, headers={"Inference-Header-Content-Length": "many"})
    assert status == 400 and "Inference-Header-Content-Length" in body["error"]
    status, body = call(infer, _infer_body(X, parameters={"top_k": 2**63 + 5}))
    assert status == 400 and "int64" in body["error"]
    status, body = call(infer, _infer_body(X, parameters={"top_k": "two"}))
    assert status == 400 and "top_k" in body["error"]
    status, body = call(infer, b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]


def test_text_as_json_strings_with_the_real_backbone() -> None:
    backbone = real_backbone()
    slot = ModelSlot()
    slot.swap(text_model(3, backbone))
    with running_servers(slot) as (http, _):
        body = {"inputs": [{"name": "TEXT", "shape": [2], "datatype": "BYTES",
                            "data": ["my card payment was declined", "book a hotel for my trip"]}]}
        status, answer = call(f"{http}/v2/models/eddy/infer", body)
        assert status == 200, answer
        assert answer["outputs"][0]["data"] == ["cards", "travel"]
        status, model = call(f"{http}/v2/models/eddy")
        assert model["inputs"][0] == {"name": "TEXT", "datatype": "BYTES", "shape": [-1]}
