"""A real Prometheus scrapes a running daemon that learns from a real broker and answers gRPC."""

from __future__ import annotations

import json

import pytest
from kafka import KafkaProducer

from service.tools.predict import predict
from tests.deploy.conftest import prometheus_server  # noqa: F401  (fixture)
from tests.integration.daemon import daemon_env, start_daemon
from tests.integration.reference import RIDGE_ENV
from tests.integration.streams import feature_events

pytestmark = [pytest.mark.kafka, pytest.mark.prometheus]


def test_prometheus_sees_events_and_predict_latency_of_a_running_daemon(
        kafka_bootstrap, topic_name, tmp_path, prometheus_server) -> None:  # noqa: F811
    events = feature_events(500, 4, seed=2)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for _, _, value in events:
        producer.send(topic_name, value)
    producer.flush()
    producer.close()
    daemon = start_daemon(tmp_path, daemon_env(tmp_path, kafka_bootstrap, topic_name, **RIDGE_ENV))
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 500)
        daemon.wait_metric("eddy_model_version", lambda v: v >= 1)
        features = json.loads(events[0][2])["features"]
        for _ in range(20):
            assert predict(daemon.addr, text=None, features=features)["model_version"] >= 1
        prom = prometheus_server([f"127.0.0.1:{daemon.metrics_port}"])
        learned = prom.wait_for('eddy_events_total{job="eddy", result="learned"} >= 500')
        assert float(learned[0]["value"][1]) == 500
        buckets = prom.wait_for('eddy_predict_seconds_bucket{rpc="Predict", input="features", le="+Inf"} >= 20')
        assert float(buckets[0]["value"][1]) >= 20
        assert prom.wait_for("eddy_broker_up == 1")
    finally:
        assert daemon.stop() == 0
