"""The daemon against the real broker: good events learned once, bad ones dead-lettered with reasons."""

from __future__ import annotations

import collections
import random

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from service.kafka.clients import committed_offsets
from tests.integration.daemon import daemon_env, start_daemon
from tests.integration.streams import feature_events, malformed

pytestmark = pytest.mark.kafka


def test_950_good_learned_50_bad_dead_lettered_offsets_committed(kafka_bootstrap, topic_name, tmp_path):
    good = feature_events(950, 7, seed=3)
    bad = malformed(50)
    messages = [v for _, _, v in good] + [raw for _, raw in bad]
    random.Random(0).shuffle(messages)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for value in messages:
        producer.send(topic_name, value)
    producer.flush()
    producer.close()

    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, EDDY_HEAD__EXPANSION_WIDTH="256",
                     EDDY_CHECKPOINT__EVERY_SECONDS="1")
    daemon = start_daemon(tmp_path, env)
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 950)
        daemon.wait_metric('eddy_events_total{result="dead_letter"}', lambda v: v >= 50)
        assert daemon.metric('eddy_events_total{result="learned"}') == 950
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]

    dlq = KafkaConsumer(f"{topic_name}.dlq", bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                        consumer_timeout_ms=5000, group_id=None)
    dead = list(dlq)
    dlq.close()
    assert len(dead) == 50
    reasons = collections.Counter(dict(m.headers)["eddy.reason"].decode() for m in dead)
    assert reasons == collections.Counter(reason for reason, _ in bad)
    assert sorted(m.value for m in dead) == sorted(raw for _, raw in bad)
    for m in dead:
        headers = dict(m.headers)
        assert headers["eddy.source.topic"].decode() == topic_name
        assert int(headers["eddy.source.offset"]) >= 0

    committed = committed_offsets(kafka_bootstrap, f"{topic_name}.g", topic_name)
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    tp = TopicPartition(topic_name, 0)
    end = consumer.end_offsets([tp])[tp]
    consumer.close()
    assert end == 1000
    assert committed == {0: end}

    state = daemon.state()
    expected = collections.Counter(label for _, label, _ in good)
    assert state["per_class_counts"] == dict(sorted(expected.items()))
    assert state["events_learned"] == 950
    assert state["dead_lettered"] == 50
