"""eddy.v1 over a real gRPC server: predictions, error codes, admin, auth, health, reflection, TLS."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service import metrics
from service.errors import ModelError
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot, load_served_model
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
from service.tools.predict import predict, rollback
from tests.service.grpc_fixtures import CLASSES, D, RegistryAdmin, make_readout, model_bytes, running_server, served

X = np.random.default_rng(1).normal(size=(4, D)).astype(np.float32)


@pytest.fixture
def slot() -> ModelSlot:
    slot = ModelSlot()
    slot.swap(served(5, seed=2))
    return slot


@pytest.fixture
def addr(slot: ModelSlot) -> Iterator[str]:
    with running_server(slot) as (address, _):
        yield address


@pytest.fixture
def stub(addr: str) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(addr) as channel:
        yield pb_grpc.InferenceStub(channel)


def _code(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def _features(row: np.ndarray) -> pb.Features:
    return pb.Features(values=row.tolist())


def test_predict_features_returns_top_k_and_version(stub: pb_grpc.InferenceStub) -> None:
    expected = make_readout(seed=2).predict_proba(X[:1])[0]
    response = stub.Predict(pb.PredictRequest(features=_features(X[0]), top_k=3))
    assert response.model_version == 5
    assert [p.label for p in response.predictions] == [CLASSES[j] for j in np.argsort(-expected)]
    assert [p.probability for p in response.predictions] == pytest.approx(
        sorted(expected, reverse=True), abs=1e-5
    )
    default = stub.Predict(pb.PredictRequest(features=_features(X[0])))
    assert len(default.predictions) == 1 and default.predictions[0].label == CLASSES[int(np.argmax(expected))]


def test_predict_batch_answers_each_row_in_order(stub: pb_grpc.InferenceStub) -> None:
    expected = make_readout(seed=2).predict_proba(X).argmax(1)
    response = stub.PredictBatch(pb.PredictBatchRequest(features=[_features(r) for r in X], top_k=2))
    assert response.model_version == 5
    assert [r.predictions[0].label for r in response.results] == [CLASSES[j] for j in expected]
    assert all(len(r.predictions) == 2 for r in response.results)


def test_top_k_is_clamped_to_known_classes(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Predict(pb.PredictRequest(features=_features(X[0]), top_k=50))
    assert len(response.predictions) == len(CLASSES)


def test_model_info_describes_the_served_model(stub: pb_grpc.InferenceStub) -> None:
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert (info.model_name, info.model_version, list(info.classes)) == ("eddy", 5, list(CLASSES))
    assert info.feature_dim == D and not info.accepts_text and info.head_kind == "ridge"
    assert info.backbone_identity == "test-backbone" and dict(info.source_offsets) == {"eddy.events:0": 50}
    assert info.created_at > 0


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            pb.PredictRequest(features=pb.Features(values=[0.0] * (D - 1))),
            "INVALID_ARGUMENT",
            f"got {D - 1} features, expected {D}",
        ),
        (pb.PredictRequest(), "INVALID_ARGUMENT", "set exactly one input: text or features"),
        (pb.PredictRequest(features=pb.Features(values=[float("nan")] * D)), "INVALID_ARGUMENT", "finite"),
        (
            pb.PredictRequest(features=pb.Features(values=[0.0] * D), top_k=-1),
            "INVALID_ARGUMENT",
            "top_k must be >= 0",
        ),
        (
            pb.PredictRequest(features=pb.Features(values=[0.0] * D), model_version=3),
            "NOT_FOUND",
            "model version 3 is not loaded; loaded versions (newest first): 5",
        ),
        (pb.PredictRequest(text="hello"), "FAILED_PRECONDITION", f"send {D} features instead"),
    ],
)
def test_predict_errors(
    stub: pb_grpc.InferenceStub, request_: pb.PredictRequest, code: str, message: str
) -> None:
    got, details = _code(stub.Predict, request_)
    assert got.name == code and message in details


def test_predict_batch_errors(stub: pb_grpc.InferenceStub) -> None:
    row = _features(X[0])
    assert _code(stub.PredictBatch, pb.PredictBatchRequest())[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = _code(stub.PredictBatch, pb.PredictBatchRequest(features=[row] * 65))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "batch of 65 inputs; at most 64" in details
    code, details = _code(stub.PredictBatch, pb.PredictBatchRequest(texts=["a"], features=[row]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in details
    code, details = _code(
        stub.PredictBatch, pb.PredictBatchRequest(features=[row, pb.Features(values=[1.0])])
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"row 1: got 1 features, expected {D}" in details


def test_no_model_yet_is_unavailable_and_not_serving() -> None:
    slot = ModelSlot()
    with running_server(slot) as (address, _), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        code, details = _code(stub.Predict, pb.PredictRequest(features=_features(X[0])))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details == "no model is served yet: waiting for the first export"
        assert _code(stub.ModelInfo, pb.ModelInfoRequest())[0] == grpc.StatusCode.UNAVAILABLE
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        watch = health.Watch(health_pb2.HealthCheckRequest(service="eddy.v1.Inference"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        slot.swap(served(1))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # pushed, not polled
        watch.cancel()
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert stub.Predict(pb.PredictRequest(features=_features(X[0]))).model_version == 1


def test_reflection_lists_every_service(addr: str) -> None:
    with grpc.insecure_channel(addr) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(responses).list_services_response.service}
    assert {
        "eddy.v1.Inference",
        "eddy.v1.Admin",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_admin_rollback_export_forget(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=5)
    slot = ModelSlot()
    for seed in (1, 2):
        version = registry.publish(model_bytes(registry.next_version(), seed=seed), {})
        slot.swap(load_served_model(registry.path(version), None))
    admin = RegistryAdmin(registry, slot)
    with running_server(slot, admin=admin) as (address, _), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AdminStub(channel)
        assert rollback(address) == 3
        with pytest.raises(ModelError, match="NOT_FOUND: unknown model version 42"):
            rollback(address, 42)
        assert slot.version == 3 and slot.get().meta["rolled_back_from"] == "1"  # type: ignore[union-attr]
        code, details = _code(stub.Rollback, pb.RollbackRequest(version=42))
        assert code == grpc.StatusCode.NOT_FOUND and "unknown model version 42; available: 1, 2, 3" in details
        assert stub.Export(pb.ExportRequest()).model_version == 4
        result = stub.Forget(pb.ForgetRequest(ids=["a", "b"]))
        assert (result.forgotten, result.unknown, result.memory_removed, result.partial) == (2, 0, 2, False)
        assert admin.forgotten == [(["a", "b"], None)]
        code, _ = _code(stub.Forget, pb.ForgetRequest(ids=["a"], label="x"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code, details = _code(stub.Forget, pb.ForgetRequest(ids=[str(i) for i in range(100_001)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 100000 ids" in details  # the control topic's cap
        assert len(admin.forgotten) == 1


def test_admin_without_handler_is_unimplemented(addr: str) -> None:
    with grpc.insecure_channel(addr) as channel:
        code, details = _code(pb_grpc.AdminStub(channel).Export, pb.ExportRequest())
    assert code == grpc.StatusCode.UNIMPLEMENTED and "serve-only" in details


def test_tokens_guard_admin_and_predictions(slot: ModelSlot, tmp_path: Path) -> None:
    admin = RegistryAdmin(ModelRegistry(tmp_path, keep=2), slot)
    before = metrics.REQUESTS.labels(rpc="Predict", code="UNAUTHENTICATED")._value.get()
    with running_server(slot, admin=admin, admin_token="s3cret-admin", predict_token="s3cret-predict") as (
        address,
        _,
    ):
        with grpc.insecure_channel(address) as channel:
            infer, adm = pb_grpc.InferenceStub(channel), pb_grpc.AdminStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            request = pb.PredictRequest(features=_features(X[0]))
            code, details = _code(infer.Predict, request)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in details
            code, details = _code(infer.Predict, request, metadata=[("authorization", "Bearer wrong")])
            assert code == grpc.StatusCode.UNAUTHENTICATED and "s3cret" not in details
            assert (
                infer.Predict(request, metadata=[("authorization", "Bearer s3cret-predict")]).model_version
                == 5
            )
            bad = [("authorization", "Bearer s3cret-predict")]
            assert (
                _code(adm.Forget, pb.ForgetRequest(ids=["a"]), metadata=bad)[0]
                == grpc.StatusCode.UNAUTHENTICATED
            )
            ok = [("authorization", "Bearer s3cret-admin")]
            assert adm.Forget(pb.ForgetRequest(ids=["a"]), metadata=ok).forgotten == 1
            assert (
                health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            )
        assert (
            predict(address, text=None, features=X[0].tolist(), token="s3cret-predict")["model_version"] == 5
        )
        with pytest.raises(ModelError, match="UNAUTHENTICATED"):
            predict(address, text=None, features=X[0].tolist())
    assert metrics.REQUESTS.labels(rpc="Predict", code="UNAUTHENTICATED")._value.get() == before + 3


def test_predict_client_returns_json_able_answer(addr: str) -> None:
    answer = predict(addr, text=None, features=X[0].tolist(), top_k=2)
    assert answer["model_version"] == 5 and len(answer["top"]) == 2
    assert answer["label"] == answer["top"][0]["label"] and answer["label"] in CLASSES
    with pytest.raises(ModelError, match="INVALID_ARGUMENT: got 1 features"):
        predict(addr, text=None, features=[1.0])
    with pytest.raises(ValueError, match="exactly one"):
        predict(addr, text="a", features=[1.0])


def test_metrics_count_requests_and_latency(stub: pb_grpc.InferenceStub) -> None:
    ok = metrics.REQUESTS.labels(rpc="Predict", code="OK")._value.get()
    observed = metrics.PREDICT_SECONDS.labels(rpc="Predict", input="features")._sum.get()
    stub.Predict(pb.PredictRequest(features=_features(X[0])))
    assert metrics.REQUESTS.labels(rpc="Predict", code="OK")._value.get() == ok + 1
    assert metrics.PREDICT_SECONDS.labels(rpc="Predict", input="features")._sum.get() > observed


def test_port_in_use_is_a_config_error(slot: ModelSlot, addr: str) -> None:
    from service.errors import ConfigError

    port = int(addr.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match="cannot bind"), running_server(slot, port=port):
        pass


def test_tls_serves_over_a_certificate(slot: ModelSlot, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {made.stderr.decode()[-200:]}")
    with running_server(slot, tls=(cert, key)) as (address, _):
        answer = predict(address, text=None, features=X[0].tolist(), tls_ca=cert)
        assert answer["model_version"] == 5
        with pytest.raises(ModelError, match="UNAVAILABLE"):
            predict(address, text=None, features=X[0].tolist(), timeout=2)  # plaintext to a TLS port


def test_predict_text_with_the_real_backbone() -> None:
    from tests.service.grpc_fixtures import real_backbone, text_model

    slot = ModelSlot()
    slot.swap(text_model(1, real_backbone()))
    with running_server(slot) as (address, _), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert (
            stub.Predict(pb.PredictRequest(text="my credit card does not work")).predictions[0].label
            == "cards"
        )
        batch = stub.PredictBatch(pb.PredictBatchRequest(texts=["flight tickets to rome", "card blocked"]))
        assert [r.predictions[0].label for r in batch.results] == ["travel", "cards"]
        assert stub.ModelInfo(pb.ModelInfoRequest()).accepts_text
        code, details = _code(stub.Predict, pb.PredictRequest(text="x" * 201))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "201 characters; at most 200" in details
        assert predict(address, text="hotel booking", features=None)["label"] == "travel"


def test_swaps_during_grpc_traffic_never_fail_or_go_backwards() -> None:
    import threading

    models = [served(v, seed=v % 4) for v in range(1, 201)]
    slot = ModelSlot()
    slot.swap(models[0])
    stop = threading.Event()
    versions: list[int] = []
    errors: list[BaseException] = []
    with running_server(slot) as (address, _), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.PredictRequest(features=_features(X[0]))

        def hammer() -> None:
            try:
                while not stop.is_set():
                    versions.append(stub.Predict(request, timeout=5).model_version)
            except BaseException as exc:
                errors.append(exc)

        client = threading.Thread(target=hammer)
        client.start()
        for model in models[1:]:
            slot.swap(model)
            if model.version % 20 == 0:  # let requests land between swaps
                n = len(versions)
                while len(versions) == n and client.is_alive():
                    stop.wait(0.001)
        stop.set()
        client.join()
    assert not errors
    assert len(versions) >= 10 and versions[-1] == 200
    assert all(a <= b for a, b in itertools.pairwise(versions))
