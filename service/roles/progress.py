"""Progress reporting shared by the learn roles: the periodic log line, consumer lag, gauges."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from kafka import KafkaConsumer, TopicPartition

from service import metrics
from service.core.batch import tp_key


class Interval:
    """A periodic duty on the monotonic clock (the progress log line, in both learn loops)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last = time.monotonic()

    def elapsed_if_due(self) -> float | None:
        """Seconds since the last time it was due, if at least ``seconds`` (restarting the interval); else None."""
        now = time.monotonic()
        elapsed = now - self._last
        if elapsed < self.seconds:
            return None
        self._last = now
        return elapsed


def consumer_lag(consumer: KafkaConsumer, topic: str, partitions: Iterable[int],
                 next_offset: Callable[[int], int | None]) -> int:
    """Events of ``topic``'s ``partitions`` behind the last fetch's high watermark, summed.

    ``next_offset(partition)`` is the next offset the state will learn (None: nothing learned, so
    the whole partition is behind). Sets ``eddy_consumer_lag{partition}`` on the way.
    """
    total = 0
    for partition in partitions:
        high = consumer.highwater(TopicPartition(topic, partition))
        if high is None:
            continue
        lag = max(high - (next_offset(partition) or 0), 0)
        metrics.CONSUMER_LAG.labels(partition=str(partition)).set(lag)
        total += lag
    return total


def assigned_partitions(consumer: KafkaConsumer, topic: str) -> list[int]:
    """The partitions of ``topic`` assigned to ``consumer``, in order."""
    return sorted(tp.partition for tp in consumer.assignment() if tp.topic == topic)


def offsets_lookup(offsets: dict[str, int], topic: str) -> Callable[[int], int | None]:
    """``next_offset`` for ``consumer_lag`` from a state's ``{"topic:partition": next}`` offsets."""
    return lambda partition: offsets.get(tp_key(topic, partition))
