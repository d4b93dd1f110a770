"""Kafka client helpers against the real broker: topics, offsets, the dead-letter writer, transactions."""

from __future__ import annotations

import datetime as dt

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.structs import OffsetAndMetadata

from service.errors import BrokerError
from service.kafka.clients import (
    ClientSecurity,
    DeadLetterWriter,
    committed_offsets,
    dlq_topic,
    end_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
)
from tests.helpers import consume, wait_for


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for v in values:
        producer.send(topic, v)
    producer.flush()
    producer.close()


def test_security_kwargs_use_kafka_python_names_and_hide_the_password() -> None:
    assert ClientSecurity().kwargs() == {"security_protocol": "PLAINTEXT"}
    sec = ClientSecurity("SASL_SSL", "SCRAM-SHA-512", "eddy", "s3cret", ssl_cafile="/ca.pem")
    assert sec.kwargs() == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                            "sasl_plain_username": "eddy", "sasl_plain_password": "s3cret",
                            "ssl_cafile": "/ca.pem"}
    assert "s3cret" not in repr(sec)


@pytest.mark.kafka
def test_ensure_topics_creates_missing_topics_once(kafka_bootstrap: str, topic_name: str) -> None:
    dlq = dlq_topic(topic_name)
    assert dlq == f"{topic_name}.dlq"
    created = ensure_topics(kafka_bootstrap, {topic_name: 3, dlq: 1}, compacted={dlq})
    assert sorted(created) == sorted([topic_name, dlq])
    assert ensure_topics(kafka_bootstrap, {topic_name: 3, dlq: 1}, compacted={dlq}) == []
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        partitions = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([topic_name, dlq])}
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, dlq, ["cleanup.policy"])],
                                         config_filter="all")
    finally:
        admin.close()
    assert partitions == {topic_name: 3, dlq: 1}
    assert configs["topic"][dlq]["cleanup.policy"]["value"] == "compact"


@pytest.mark.kafka
def test_end_and_committed_offsets(kafka_bootstrap: str, topic_name: str) -> None:
    _produce(kafka_bootstrap, topic_name, [b"a", b"b", b"c", b"d", b"e"])
    assert end_offsets(kafka_bootstrap, topic_name) == {0: 5}
    assert end_offsets(kafka_bootstrap, topic_name + "-missing") == {}
    group = f"{topic_name}.g"
    assert committed_offsets(kafka_bootstrap, group, topic_name) == {}
    consumer = make_consumer(kafka_bootstrap, group_id=group, topics=None, client_id="test")
    try:
        tp = TopicPartition(topic_name, 0)
        consumer.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(3, "", -1)})
    finally:
        consumer.close()
    assert committed_offsets(kafka_bootstrap, group, topic_name) == {0: 3}
    assert committed_offsets(kafka_bootstrap, group, "other-topic") == {}


@pytest.mark.kafka
def test_consumer_reads_bytes_and_never_autocommits(kafka_bootstrap: str, topic_name: str) -> None:
    _produce(kafka_bootstrap, topic_name, [b"\xff\x00raw", b"two"])
    group = f"{topic_name}.g"
    consumer = make_consumer(kafka_bootstrap, group_id=group, topics=[topic_name], client_id="test",
                             session_timeout_ms=6000, heartbeat_interval_ms=500)
    seen: list[bytes] = []
    try:
        def read() -> bool:
            for batch in consumer.poll(timeout_ms=200).values():
                seen.extend(r.value for r in batch)
            return len(seen) >= 2
        wait_for(read, 30, interval=0, message="two records")
    finally:
        consumer.close()
    assert seen == [b"\xff\x00raw", b"two"]
    assert committed_offsets(kafka_bootstrap, group, topic_name) == {}


def test_unreachable_broker_is_a_broker_error() -> None:
    with pytest.raises(BrokerError, match=r"connecting a producer at 127.0.0.1:1 failed"):
        make_producer("127.0.0.1:1", bootstrap_timeout_ms=500)
    with pytest.raises(BrokerError, match=r"connecting a consumer at 127.0.0.1:1 failed"):
        make_consumer("127.0.0.1:1", group_id="g", bootstrap_timeout_ms=500)


@pytest.mark.kafka
def test_dead_letters_keep_original_bytes_and_carry_reasons(kafka_bootstrap: str, topic_name: str) -> None:
    producer = make_producer(kafka_bootstrap)
    writer = DeadLetterWriter(producer, dlq_topic(topic_name))
    before = dt.datetime.now(dt.UTC)
    writer.send(b"\xff\xfenot utf8", reason="not_utf8", detail="message is not UTF-8", topic=topic_name,
                partition=0, offset=7, headers=[("trace", b"abc"), ("eddy.reason", b"forged")])
    writer.send(None, reason="not_json", detail="message has no value (tombstone)", topic=topic_name,
                partition=2, offset=0)
    assert writer.pending == 2
    writer.flush(timeout=30)
    assert writer.pending == 0
    producer.close()

    dead = sorted(consume(kafka_bootstrap, dlq_topic(topic_name), 2), key=lambda r: r.key)
    assert len(dead) == 2
    first, second = dead
    assert first.value == b"\xff\xfenot utf8"
    assert first.key == f"{topic_name}:0:7".encode()
    assert first.headers[0] == ("trace", b"abc")  # original headers first, in order
    h = dict(first.headers)
    assert [k for k, _ in first.headers].count("eddy.reason") == 1  # a forged reason is replaced
    assert h["eddy.reason"] == b"not_utf8"
    assert h["eddy.detail"] == b"message is not UTF-8"
    assert h["eddy.source.topic"] == topic_name.encode()
    assert (h["eddy.source.partition"], h["eddy.source.offset"]) == (b"0", b"7")
    failed_at = dt.datetime.fromisoformat(h["eddy.failed_at"].decode().replace("Z", "+00:00"))
    assert before - dt.timedelta(seconds=1) <= failed_at <= dt.datetime.now(dt.UTC)
    assert second.value is None
    assert second.key == f"{topic_name}:2:0".encode()
    assert dict(second.headers)["eddy.reason"] == b"not_json"


@pytest.mark.kafka
def test_oversized_dead_letter_is_truncated_and_marked(kafka_bootstrap: str, topic_name: str) -> None:
    producer = make_producer(kafka_bootstrap)
    writer = DeadLetterWriter(producer, dlq_topic(topic_name), max_value_bytes=10)
    writer.send(b"0123456789abcdef", reason="too_large", detail="big", topic=topic_name, partition=0,
                offset=1)
    writer.flush(timeout=30)
    producer.close()
    (rec,) = consume(kafka_bootstrap, dlq_topic(topic_name), 1)
    assert rec.value == b"0123456789"
    assert dict(rec.headers)["eddy.truncated"] == b"16"


@pytest.mark.kafka
def test_dead_letters_the_broker_rejects_make_every_flush_fail(kafka_bootstrap: str, topic_name: str) -> None:
    dlq = dlq_topic(topic_name)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics({dlq: {"num_partitions": 1, "replication_factor": 1,
                               "configs": {"max.message.bytes": "200"}}}, wait_for_metadata=True)
    admin.close()
    producer = make_producer(kafka_bootstrap, retries=0, enable_idempotence=False)
    writer = DeadLetterWriter(producer, dlq)
    writer.send(b"x" * 1000, reason="not_json", detail="d", topic=topic_name, partition=0, offset=0)
    with pytest.raises(BrokerError, match=r"1 of 1 dead letters were not written to .*\.dlq"):
        writer.flush(timeout=30)
    with pytest.raises(BrokerError, match=r"dead letters were not written"):
        writer.flush(timeout=30)  # still failed: offsets must not move past it
    producer.close()


@pytest.mark.kafka
def test_transactions_commit_records_and_offsets_atomically(kafka_bootstrap: str, topic_name: str) -> None:
    """kafka-python 3 transactions: what an exactly-once dead-letter write would rely on."""
    source, dlq, group = topic_name, dlq_topic(topic_name), f"{topic_name}.g"
    ensure_topics(kafka_bootstrap, {source: 1, dlq: 1})
    _produce(kafka_bootstrap, source, [b"e0", b"e1", b"e2"])
    consumer = make_consumer(kafka_bootstrap, group_id=group, topics=[source], client_id="tx-test")
    producer = make_producer(kafka_bootstrap, transactional_id=f"{topic_name}.tx")
    try:
        producer.init_transactions()
        records: list = []

        def read() -> bool:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            return len(records) >= 3
        wait_for(read, 30, interval=0, message="three source records")
        tp = TopicPartition(source, 0)

        producer.begin_transaction()  # aborted: neither the record nor the offset may become visible
        producer.send(dlq, b"aborted", key=b"k0")
        producer.send_offsets_to_transaction({tp: OffsetAndMetadata(1, "", -1)}, consumer.group_metadata())
        producer.abort_transaction()
        assert committed_offsets(kafka_bootstrap, group, source) == {}

        producer.begin_transaction()
        producer.send(dlq, b"committed", key=b"k1")
        producer.send_offsets_to_transaction({tp: OffsetAndMetadata(3, "", -1)}, consumer.group_metadata())
        producer.commit_transaction()
    finally:
        producer.close()
        consumer.close()
    assert committed_offsets(kafka_bootstrap, group, source) == {0: 3}
    reader = KafkaConsumer(dlq, bootstrap_servers=kafka_bootstrap, group_id=None,
                           auto_offset_reset="earliest", isolation_level="read_committed",
                           consumer_timeout_ms=3000)
    try:
        assert [r.value for r in reader] == [b"committed"]
    finally:
        reader.close()
