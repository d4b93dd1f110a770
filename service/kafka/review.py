"""The Kafka end of the review queue: records for a person to label, on ``<topic>.review``.

``service.serving.review.ReviewQueue`` decides what to publish and calls ``publish`` from its own
thread; this class only encodes and sends (JSON value, the record id as key). ``send`` is
asynchronous in kafka-python; a full buffer blocks this thread for at most the producer's
``max_block_ms``, never a request.
"""

from __future__ import annotations

import json
from typing import Any

from kafka import KafkaProducer


class KafkaReviewSink:
    """Publishes review records to one topic (fits ``service.serving.review.ReviewSink``)."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    def publish(self, key: str, record: dict[str, Any]) -> None:
        """Send ``record`` as JSON with key ``key``; kafka-python errors propagate (counted as failed)."""
        self.producer.send(self.topic, key=key.encode(), value=json.dumps(record, ensure_ascii=False).encode())
