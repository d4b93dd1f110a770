"""Small helpers shared by eddy's tests: condition waits and reading a topic back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05,
             message: str = "the condition") -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail after ``timeout`` s.

    Use this instead of a fixed sleep: it returns as soon as the condition holds. The failure is an
    ``AssertionError`` naming ``message`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message} "
                                 f"(last value: {value!r})")
        time.sleep(interval)


def consume(bootstrap: str, topic: str, count: int, timeout: float = 30.0, **config: Any) -> list[Any]:
    """The first ``count`` records of ``topic`` (all partitions, from the beginning, no group).

    Fails when fewer than ``count`` arrive within ``timeout`` s; returns early once ``count`` have
    arrived, then keeps reading briefly (0.5 s) so an unexpected extra record is returned too.
    """
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, **config)
    records: list[Any] = []
    try:
        def more() -> bool:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            return len(records) >= count

        wait_for(more, timeout, interval=0, message=f"{count} records on {topic} (got {len(records)})")
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for batch in consumer.poll(timeout_ms=100).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records
