"""Re-read individual events from Kafka by (partition, offset), for exact forgetting."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from kafka import KafkaConsumer, TopicPartition


class KafkaRefetcher:
    """Fetches the raw values at given offsets of one topic (no consumer group, nothing committed)."""

    def __init__(self, bootstrap: str, topic: str, security: Any, timeout_s: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.security = security
        self.timeout_ms = int(timeout_s * 1000)
        self._consumer: KafkaConsumer | None = None

    def _get(self) -> KafkaConsumer:
        if self._consumer is None:
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                           enable_auto_commit=False, auto_offset_reset="earliest",
                                           **self.security.kwargs())
        return self._consumer

    def __call__(self, locations: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes | None]:
        """Values at each (partition, offset); a location that cannot be read is absent."""
        wanted: dict[int, set[int]] = defaultdict(set)
        for partition, offset in locations:
            wanted[partition].add(offset)
        consumer = self._get()
        found: dict[tuple[int, int], bytes | None] = {}
        deadline = time.monotonic() + self.timeout_ms / 1000
        for partition, offsets in wanted.items():
            tp = TopicPartition(self.topic, partition)
            consumer.assign([tp])
            first = consumer.beginning_offsets([tp]).get(tp, 0)
            for offset in sorted(offsets):
                # Offsets deleted by retention are unknown at once; one overall deadline bounds the rest.
                if (partition, offset) in found or offset < first or time.monotonic() > deadline:
                    continue
                consumer.seek(tp, offset)
                for rec in consumer.poll(timeout_ms=self.timeout_ms, max_records=500).get(tp, []):
                    if rec.offset in offsets:
                        found[(partition, rec.offset)] = rec.value
        return found

    def close(self) -> None:
        """Close the consumer."""
        if self._consumer is not None:
            self._consumer.close()
