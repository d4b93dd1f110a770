"""The unknown-input loop against the real broker and the real daemon.

Out-of-scope predictions reach ``<topic>.review`` with their scores (rate-limited, de-duplicated);
a person labels one and produces it back as an ordinary event; the daemon learns it. Events
labelled with the unknown label are counted, never learned.
"""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer

from service.core.events import encode
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.daemon import daemon_env, start_daemon
from tests.integration.streams import DIM, feature_events

pytestmark = pytest.mark.kafka


def far_rows(n: int, seed: int) -> np.ndarray:
    """Random unit directions: in 384 dimensions, far from the learned class centres."""
    X = np.random.default_rng(seed).normal(size=(n, DIM))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def review_records(bootstrap: str, topic: str, want: int, timeout: float = 30) -> list[dict]:
    """Read ``topic`` from the start until ``want`` records came or ``timeout`` passed; then a little longer."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                             consumer_timeout_ms=3000)
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(out) < want:
            out.extend(json.loads(m.value) for m in consumer)
    finally:
        consumer.close()
    return out


def test_rejected_predictions_reach_the_review_topic_and_a_relabelled_one_is_learned(
        kafka_bootstrap, topic_name, tmp_path) -> None:
    good = feature_events(400, 5, seed=11)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for _, _, value in good:
        producer.send(topic_name, value)
    producer.flush()
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, EDDY_HEAD__EXPANSION_WIDTH="256",
                     EDDY_SERVING__REVIEW__ENABLED="true", EDDY_SERVING__REVIEW__MAX_PER_SECOND="2",
                     EDDY_SERVING__REVIEW__MARGIN="0")
    daemon = start_daemon(tmp_path, env)
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 400)
        daemon.wait_metric("eddy_unknown_threshold", lambda v: v > 0)
        far = far_rows(12, seed=5)
        with grpc.insecure_channel(daemon.addr) as channel:
            stub = pb_grpc.InferenceStub(channel)
            batch = stub.PredictBatch(pb.PredictBatchRequest(features=[pb.Features(values=r.tolist()) for r in far]))
            assert all(r.unknown and r.label == "<unknown>" for r in batch.results)
            again = stub.PredictBatch(pb.PredictBatchRequest(features=[pb.Features(values=far[0].tolist())]))
            assert again.results[0].unknown
        daemon.wait_metric('eddy_predictions_unknown_total{api="eddy.v1"}', lambda v: v >= 13)
        records = review_records(kafka_bootstrap, f"{topic_name}.review", want=2)
        # 13 rejected predictions in well under a second: a burst of 2 at 2/s passes (a refill may
        # add one more); the repeated row is a duplicate, never a second record.
        assert 1 <= len(records) <= 3, records
        assert len({r["id"] for r in records}) == len(records)
        first = records[0]
        assert first["unknown"] and first["reason"] == "unknown" and first["score"] < first["threshold"]
        assert first["model_version"] >= 1 and len(first["features"]) == DIM
        assert first["top"][0]["label"].startswith("class-")
        assert daemon.metric('eddy_review_records_total{result="published"}') == len(records)
        assert daemon.metric('eddy_review_records_total{result="rate_limited"}') >= 13 - 3 - 1

        # A person labels it and produces it back as an ordinary event; an unknown-labelled one is only counted.
        producer.send(topic_name, encode("reviewed-1", "class-new", features=first["features"]))
        producer.send(topic_name, encode("reviewed-2", "<unknown>", features=far[-1].tolist()))
        producer.flush()
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 401)
        daemon.wait_metric('eddy_events_total{result="unknown_label"}', lambda v: v >= 1)
        daemon.wait_metric('eddy_unknown_checks_total{kind="unknown",result="rejected"}', lambda v: v >= 1)
        with grpc.insecure_channel(daemon.addr) as channel:
            deadline = time.monotonic() + 60
            while "class-new" not in pb_grpc.InferenceStub(channel).ModelInfo(pb.ModelInfoRequest()).classes:
                assert time.monotonic() < deadline, "the re-labelled event never reached the served model"
                time.sleep(0.2)
            classes = list(pb_grpc.InferenceStub(channel).ModelInfo(pb.ModelInfoRequest()).classes)
        assert "<unknown>" not in classes
    finally:
        producer.close()
        assert daemon.stop() == 0, daemon.log()[-3000:]
    state = daemon.state()
    assert state["per_class_counts"]["class-new"] == 1 and "<unknown>" not in state["per_class_counts"]
