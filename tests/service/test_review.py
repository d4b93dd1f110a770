"""The review queue on the request path: de-duplicated, rate-limited, bounded, never blocking.

The sink is the ``ReviewSink`` protocol itself (a list, or one that blocks until released); the
Kafka sink against the real broker is exercised in tests/integration/test_review_loop.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from service import metrics
from service.serving.review import ReviewOptions, ReviewQueue
from tests.service.grpc_fixtures import D, served


class ListSink:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.gate = gate
        self.arrived = threading.Event()

    def publish(self, key: str, record: dict[str, Any]) -> None:
        self.arrived.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.records.append((key, record))


def count(result: str) -> float:
    return metrics.REVIEW_RECORDS.labels(result=result)._value.get()


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    probs = np.tile(np.array([[0.5, 0.3, 0.2]], dtype=np.float32), (n, 1))
    return X, probs, probs.max(axis=1)


def test_rejected_rows_are_published_once_with_their_scores_and_top_labels() -> None:
    sink = ListSink()
    queue = ReviewQueue(sink, ReviewOptions(max_per_second=1000, margin=0.0))
    model = served(3, extra_meta={"unknown_threshold": "0.6"})
    X, probs, score = batch(4)
    unknown = np.array([True, False, True, False])
    duplicates = count("duplicate")
    queue.offer(model, X, probs, score, unknown)
    queue.offer(model, X[:1], probs[:1], score[:1], unknown[:1])  # seen already
    queue.close()
    assert [r["features"] for _, r in sink.records] == [X[0].tolist(), X[2].tolist()]
    record = sink.records[0][1]
    assert record["unknown"] and record["reason"] == "unknown" and record["model_version"] == 3
    assert record["score"] == 0.5 and record["threshold"] == 0.6
    assert [t["label"] for t in record["top"]] == ["billing", "cards", "travel"]
    assert sink.records[0][0] == record["id"] != sink.records[1][0]
    assert count("duplicate") == duplicates + 1


def test_low_margin_rows_are_offered_and_texts_are_kept_as_texts() -> None:
    sink = ListSink()
    queue = ReviewQueue(sink, ReviewOptions(max_per_second=1000, margin=0.25))
    _, probs, score = batch(2)
    probs[1] = [0.9, 0.05, 0.05]  # margin 0.85: confident, not offered
    queue.offer(served(1), ["is this a refund?", "my card"], probs, score, np.zeros(2, bool))
    queue.close()
    assert [(r["text"], r["reason"], r["unknown"]) for _, r in sink.records] == [("is this a refund?", "low_margin",
                                                                                  False)]


def test_at_most_the_configured_rate_is_published() -> None:
    sink = ListSink()
    queue = ReviewQueue(sink, ReviewOptions(max_per_second=2, margin=0.0))
    X, probs, score = batch(50)
    limited = count("rate_limited")
    queue.offer(served(1), X, probs, score, np.ones(50, bool))
    queue.close()
    assert 1 <= len(sink.records) <= 3  # a burst of 2 (and one refill, on a slow machine)
    assert count("rate_limited") - limited == 50 - len(sink.records)


def test_offer_never_blocks_on_a_stuck_sink_and_drops_when_the_queue_is_full() -> None:
    gate = threading.Event()
    sink = ListSink(gate)
    queue = ReviewQueue(sink, ReviewOptions(max_per_second=1000, margin=0.0, queue_size=2))
    X, probs, score = batch(6)
    dropped = count("dropped")
    queue.offer(served(1), X[:1], probs[:1], score[:1], np.ones(1, bool))
    wait_for(sink.arrived.is_set)  # the thread holds row 0 inside the sink
    queue.offer(served(1), X[1:], probs[1:], score[1:], np.ones(5, bool))  # returns: 2 queued, 3 dropped
    assert count("dropped") - dropped == 3
    gate.set()
    queue.close()
    assert len(sink.records) == 3
