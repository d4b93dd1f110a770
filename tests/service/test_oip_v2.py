"""The Open Inference Protocol v2 endpoint, driven by the unmodified tritonclient gRPC client."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from service.models.served import ModelSlot
from tests.service.grpc_fixtures import CLASSES, D, make_readout, real_backbone, running_server, served, text_model

X = np.random.default_rng(2).normal(size=(5, D)).astype(np.float32)


@pytest.fixture
def slot() -> ModelSlot:
    slot = ModelSlot()
    slot.swap(served(4, seed=7))
    return slot


@pytest.fixture
def client(slot: ModelSlot) -> Iterator[tc.InferenceServerClient]:
    with running_server(slot) as (address, _):
        client = tc.InferenceServerClient(address)
        yield client
        client.close()


def _features(x: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput("FEATURES", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _status(call: object, *args: object, **kwargs: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return str(info.value.status()), info.value.message()


def test_server_and_model_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("eddy") and client.is_model_ready("eddy", "4")
    assert not client.is_model_ready("eddy", "3") and not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert server.name == "eddy" and server.version and list(server.extensions) == []
    model = client.get_model_metadata("eddy")
    assert list(model.versions) == ["4"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("FEATURES", "FP32", [-1, D])]
    assert [(t.name, t.datatype) for t in model.outputs] == [("LABEL", "BYTES"), ("PROBABILITY", "FP32"),
                                                              ("UNKNOWN", "BOOL"), ("SCORE", "FP32")]


def test_infer_features_top1_by_default(client: tc.InferenceServerClient) -> None:
    result = client.infer("eddy", [_features(X)])
    expected = make_readout(seed=7).predict_proba(X)
    labels = result.as_numpy("LABEL")
    assert labels.shape == (5, 1)
    assert [v.decode() for v in labels[:, 0]] == [CLASSES[j] for j in expected.argmax(1)]
    np.testing.assert_allclose(result.as_numpy("PROBABILITY")[:, 0], expected.max(1), atol=1e-5)
    response = result.get_response()
    assert response.model_version == "4" and response.parameters["model_version"].int64_param == 4


def test_infer_top_k_parameter_and_requested_outputs(client: tc.InferenceServerClient) -> None:
    result = client.infer(
        "eddy", [_features(X[:2])], outputs=[tc.InferRequestedOutput("PROBABILITY")], parameters={"top_k": 3}
    )
    probs = result.as_numpy("PROBABILITY")
    assert probs.shape == (2, 3) and result.as_numpy("LABEL") is None
    assert np.all(np.diff(probs, axis=1) <= 0)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_infer_errors(client: tc.InferenceServerClient) -> None:
    status, message = _status(client.infer, "nope", [_features(X)])
    assert status == "StatusCode.NOT_FOUND" and "serves 'eddy'" in message
    status, message = _status(client.infer, "eddy", [_features(X)], model_version="2")
    assert status == "StatusCode.NOT_FOUND"
    assert "model version 2 is not loaded; loaded versions (newest first): 4" in message
    status, message = _status(client.infer, "eddy", [_features(X[:, :-1])])
    assert status == "StatusCode.INVALID_ARGUMENT" and f"got {D - 1} features, expected {D}" in message
    wrong = tc.InferInput("FEATURES", [5, D], "FP64")
    wrong.set_data_from_numpy(X.astype(np.float64))
    status, message = _status(client.infer, "eddy", [wrong])
    assert status == "StatusCode.INVALID_ARGUMENT" and "expected FP32" in message
    status, message = _status(client.infer, "eddy", [_features(X), _features(X)])
    assert status == "StatusCode.INVALID_ARGUMENT" and "exactly one input" in message
    status, message = _status(client.infer, "eddy", [_features(np.zeros((0, D), dtype=np.float32))])
    assert status == "StatusCode.INVALID_ARGUMENT" and "empty batch" in message
    status, message = _status(client.infer, "eddy", [_features(np.zeros((65, D), dtype=np.float32))])
    assert status == "StatusCode.INVALID_ARGUMENT" and "at most 64" in message
    status, message = _status(client.infer, "eddy", [_features(X)], outputs=[tc.InferRequestedOutput("X")])
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown outputs ['X']" in message


def test_infer_text_without_backbone_is_refused(client: tc.InferenceServerClient) -> None:
    text = tc.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array(["hello"], dtype=object))
    status, message = _status(client.infer, "eddy", [text])
    assert status == "StatusCode.FAILED_PRECONDITION" and f"send {D} features" in message


def test_no_model_yet() -> None:
    with running_server(ModelSlot()) as (address, _):
        client = tc.InferenceServerClient(address)
        assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready("eddy")
        status, message = _status(client.infer, "eddy", [_features(X)])
        assert status == "StatusCode.UNAVAILABLE"
        assert message.endswith("no model is served yet: waiting for the first export")
        client.close()


def test_contents_instead_of_raw_bytes(slot: ModelSlot) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    request = pb.ModelInferRequest(model_name="eddy")
    tensor = request.inputs.add(name="FEATURES", datatype="FP32", shape=[2, D])
    tensor.contents.fp32_contents.extend(X[:2].ravel().tolist())
    with running_server(slot) as (address, _), grpc.insecure_channel(address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    labels = response.raw_output_contents[0]
    assert labels[4 : 4 + int.from_bytes(labels[:4], "little")].decode() in CLASSES
    assert [o.name for o in response.outputs] == ["LABEL", "PROBABILITY", "UNKNOWN", "SCORE"]


def test_infer_text_with_the_real_backbone() -> None:
    backbone = real_backbone()
    slot = ModelSlot()
    slot.swap(text_model(2, backbone))
    with running_server(slot) as (address, _):
        client = tc.InferenceServerClient(address)
        names = [t.name for t in client.get_model_metadata("eddy").inputs]
        assert names == ["TEXT", "FEATURES"]
        text = tc.InferInput("TEXT", [3], "BYTES")
        text.set_data_from_numpy(
            np.array(["card declined at the shop", "flight to tokyo", "héllo ✈ trip"], dtype=object)
        )
        result = client.infer("eddy", [text], parameters={"top_k": 2})
        labels = [[v.decode() for v in row] for row in result.as_numpy("LABEL")]
        assert labels[0] == ["cards", "travel"] and labels[1] == ["travel", "cards"]
        assert result.as_numpy("PROBABILITY").shape == (3, 2)
        long = tc.InferInput("TEXT", [1], "BYTES")
        long.set_data_from_numpy(np.array(["x" * 201], dtype=object))
        status, message = _status(client.infer, "eddy", [long])
        assert status == "StatusCode.INVALID_ARGUMENT" and "at most 200" in message
        client.close()


def _oip_parameters(message: pb.ModelMetadataResponse) -> dict[str, str]:
    """Read ``parameters`` (field 6) the way a client compiled from the OIP proto does."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="oip_meta_test.proto", package="oiptest", syntax="proto3")
    param = f.message_type.add(name="Param")
    param.field.add(name="string_param", number=3, type=9, label=1)
    meta = f.message_type.add(name="Meta")
    entry = meta.nested_type.add(name="ParametersEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=11, label=1, type_name=".oiptest.Param")
    meta.field.add(name="parameters", number=6, type=11, label=3, type_name=".oiptest.Meta.ParametersEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("oiptest.Meta"))
    parsed = cls.FromString(message.SerializeToString())
    return {k: v.string_param for k, v in parsed.parameters.items()}


def test_model_metadata_names_the_backbone(client: tc.InferenceServerClient) -> None:
    model = client.get_model_metadata("eddy")
    assert _oip_parameters(model) == {"backbone": "test-backbone", "head_kind": "ridge"}
