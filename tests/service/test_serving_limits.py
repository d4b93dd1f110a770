"""Per-request limits: top_k caps, answers refused before they are built, paged ModelInfo (issue 14)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from service.models.served import ModelSlot
from service.serving.grpc.common import ranked
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
from tests.service.grpc_fixtures import D, running_server, served

N_CLASSES = 300
CLASSES = tuple(f"class-{i:03d}-" + "x" * 200 for i in range(N_CLASSES))  # ~211-byte labels


@pytest.fixture(scope="module")
def slot() -> ModelSlot:
    s = ModelSlot()
    s.swap(served(1, classes=CLASSES))
    return s


@pytest.fixture(scope="module")
def addr(slot: ModelSlot) -> Iterator[str]:
    with running_server(slot, max_batch=1024, max_top_k=50, max_message_bytes=1 << 20,
                        max_request_chars=1000) as (address, _):
        yield address


@pytest.fixture(scope="module")
def channel(addr: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(addr) as ch:
        yield ch


def _rows(n: int) -> list[pb.Features]:
    rng = np.random.default_rng(0)
    return [pb.Features(values=row.tolist()) for row in rng.normal(size=(n, D)).astype(np.float32)]


def _code(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_top_k_is_capped_by_max_top_k(channel: grpc.Channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    reply = stub.PredictBatch(pb.PredictBatchRequest(features=_rows(3), top_k=10**9), timeout=10)
    assert [len(r.predictions) for r in reply.results] == [50, 50, 50]
    probs = [p.probability for p in reply.results[0].predictions]
    assert probs == sorted(probs, reverse=True)
    one = stub.Predict(pb.PredictRequest(features=_rows(1)[0], top_k=2**31 - 1), timeout=10)
    assert len(one.predictions) == 50


def test_oip_top_k_is_capped_too(channel: grpc.Channel) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    X = np.random.default_rng(1).normal(size=(2, D)).astype("<f4")
    request = oip_pb.ModelInferRequest(model_name="eddy", raw_input_contents=[X.tobytes()])
    request.inputs.add(name="FEATURES", datatype="FP32", shape=[2, D])
    request.parameters["top_k"].int64_param = 10**12
    reply = stub.ModelInfer(request, timeout=10)
    assert [list(o.shape) for o in reply.outputs] == [[2, 50], [2, 50], [2], [2]]  # LABEL, PROBABILITY, UNKNOWN, SCORE


def test_an_answer_too_big_to_send_is_refused_quickly_before_it_is_built(channel: grpc.Channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    start = time.monotonic()
    code, message = _code(stub.PredictBatch, pb.PredictBatchRequest(features=_rows(1024), top_k=10**9))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1024 inputs x 50 labels" in message and "serving.max_message_bytes" in message
    assert time.monotonic() - start < 5
    # The same request with a smaller top_k fits and is answered.
    reply = stub.PredictBatch(pb.PredictBatchRequest(features=_rows(1024), top_k=3), timeout=10)
    assert len(reply.results) == 1024


def test_oip_refuses_an_answer_too_big_to_send(channel: grpc.Channel) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    X = np.random.default_rng(2).normal(size=(1024, D)).astype("<f4")
    request = oip_pb.ModelInferRequest(model_name="eddy", raw_input_contents=[X.tobytes()])
    request.inputs.add(name="FEATURES", datatype="FP32", shape=[1024, D])
    request.parameters["top_k"].int64_param = 10**9
    code, message = _code(stub.ModelInfer, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "top_k" in message


def test_model_info_pages_classes_that_do_not_fit_in_one_message(slot: ModelSlot) -> None:
    # 300 labels of ~211 bytes are ~64 KB: with a 100 KB message limit they come in pages.
    with running_server(slot, max_message_bytes=100_000) as (addr, _), grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.InferenceStub(ch)
        seen: list[str] = []
        offset, pages = 0, 0
        while True:
            reply = stub.ModelInfo(pb.ModelInfoRequest(class_offset=offset), timeout=10)
            assert reply.classes_total == N_CLASSES and reply.class_offset == offset
            assert reply.ByteSize() <= 100_000
            seen += reply.classes
            offset += len(reply.classes)
            pages += 1
            if offset >= reply.classes_total:
                break
        assert tuple(seen) == CLASSES and pages > 1
        limited = stub.ModelInfo(pb.ModelInfoRequest(class_offset=10, class_limit=5), timeout=10)
        assert list(limited.classes) == list(CLASSES[10:15])
        code, _ = _code(stub.ModelInfo, pb.ModelInfoRequest(class_offset=-1))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_model_info_lists_every_class_when_they_fit(channel: grpc.Channel) -> None:
    reply = pb_grpc.InferenceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert tuple(reply.classes) == CLASSES and reply.classes_total == N_CLASSES


def test_total_characters_per_request_are_bounded(slot: ModelSlot) -> None:
    class Echo:
        identity, dim = "echo", D

        def embed(self, texts: list[str]) -> np.ndarray:
            return np.ones((len(texts), D), np.float32)

    text_slot = ModelSlot()
    text_slot.swap(served(1, classes=CLASSES, backbone=Echo()))
    with running_server(text_slot, max_text_chars=200, max_request_chars=1000) as (addr, _), \
            grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.InferenceStub(ch)
        code, message = _code(stub.PredictBatch, pb.PredictBatchRequest(texts=["y" * 150] * 7))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "1050 characters" in message and "serving.max_request_chars" in message
        reply = stub.PredictBatch(pb.PredictBatchRequest(texts=["y" * 150] * 6), timeout=10)
        assert len(reply.results) == 6


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 60), st.integers(1, 60), st.integers(0, 2**31 - 1), st.booleans())
def test_ranked_equals_the_stable_full_sort(rows: int, classes: int, k: int, seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.random((rows, classes)).astype(np.float32)
    if ties:  # few distinct values: ties everywhere, including across the cut
        probs = np.round(probs * 3) / 3
    k = min(k, classes)
    order, top = ranked(probs, k)
    expected = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(top, np.take_along_axis(probs, expected, axis=1))
