"""The learn loop against the real broker: how it polls and batches (LearnLoop.step's contract)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from kafka import KafkaProducer

from service.core.batch import Record
from service.core.events import encode
from service.core.snapshots import SnapshotStore
from service.core.state import new_state
from service.kafka.clients import DeadLetterWriter, ensure_topics, make_consumer, make_producer
from service.roles.learn_loop import LearnLoop, LoopOptions

D = 8
N = 1_300  # several fetches' worth at batch 100, with a remainder
BATCH = 100


def test_a_poll_is_learned_in_batches_and_drained_before_the_next_poll(kafka_bootstrap, topic_name,
                                                                         tmp_path: Path) -> None:
    """Every event is learned once, in offset order, at most ``batch_max_events`` per step, and the
    consumer is polled again only once everything it returned is learned (leaving records in
    kafka-python's buffer stalled fetches of the events partition behind the control topic's)."""
    control = f"{topic_name}.control"
    ensure_topics(kafka_bootstrap, {topic_name: 1, control: 1})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    rng = np.random.default_rng(0)
    for i in range(N):
        producer.send(topic_name, encode(f"e{i}", f"c{i % 3}", features=rng.normal(size=D), base64_features=i % 2 == 0))
    producer.flush()
    producer.close()

    consumer = make_consumer(kafka_bootstrap, group_id=f"{topic_name}.g", session_timeout_ms=6_000,
                             heartbeat_interval_ms=500)
    dlq_producer = make_producer(kafka_bootstrap)
    state = new_state("ncm", {}, None, window=10_000, backbone_identity="none")
    options = LoopOptions(topic=topic_name, control_topic=control, dim=D, max_event_bytes=10_000,
                          batch_max_events=BATCH, poll_timeout_ms=200, export_every_events=10**9,
                          export_every_seconds=1e9, snapshot_every_events=10**9, snapshot_every_seconds=1e9,
                          log_every_seconds=1e9, holdout_size=16, gcv_every_seconds=1e9, head_label="ncm")
    loop = LearnLoop(consumer=consumer, dlq=DeadLetterWriter(dlq_producer, f"{topic_name}.dlq"), state=state,
                     store=SnapshotStore(tmp_path), exporter=None, embed=None, refetch=None,  # type: ignore[arg-type]
                     options=options)
    batches: list[list[Record]] = []
    polls_with_records_unlearned: list[int] = []
    learn, poll = loop._learn, consumer.poll

    def record_learn(records: list[Record]) -> None:
        batches.append(records)
        learn(records)

    def record_poll(*args: object, **kwargs: object) -> object:
        if loop._buffered:
            polls_with_records_unlearned.append(len(loop._buffered))
        return poll(*args, **kwargs)

    loop._learn = record_learn  # type: ignore[method-assign]
    consumer.poll = record_poll  # type: ignore[method-assign]
    from service.kafka.clients import RebalanceCallbacks, subscribe

    subscribe(consumer, [topic_name, control], listener=RebalanceCallbacks(lambda _: None, loop.seek_to_state))
    try:
        for _ in range(2_000):
            if state.counters.learned >= N:
                break
            loop.step()
    finally:
        loop.exports.close(state)
        loop.snapshots.close()
        consumer.close()
        dlq_producer.close()

    assert state.counters.learned == N and state.counters.dead_lettered == 0
    assert [r.offset for b in batches for r in b] == list(range(N))  # once each, in order
    assert max(len(b) for b in batches) <= BATCH
    assert polls_with_records_unlearned == []
    assert any(len(b) == BATCH for b in batches)  # a poll held more than one batch: it was split
