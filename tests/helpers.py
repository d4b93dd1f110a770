"""Small helpers shared by eddy's tests: condition waits and reading a topic back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05,
             message: str = "the condition", ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail after ``timeout`` s.

    The one condition wait of the test suite: use it instead of a fixed sleep, it returns as soon
    as the condition holds. Exceptions of the types in ``ignore`` (a server not listening yet)
    count as "not yet". The failure is an ``AssertionError`` naming ``message`` and the last value
    or error seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value: Any = predicate()
        except ignore as exc:
            value = exc
        if value and not isinstance(value, BaseException):
            return value  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message} "
                                 f"(last value: {value!r})")
        time.sleep(interval)


async def async_wait_for(predicate: Callable[[], T], timeout: float = 5.0, message: str = "the condition") -> T:
    """``wait_for`` for code running on an asyncio loop: yields to the loop between checks."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message} (last value: {value!r})")
        await asyncio.sleep(0.001)


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


# Several consumers joining one group at the same moment: in about one run in ten on these machines,
# kafka-python 3.0.12 leaves one member waiting in JoinGroup while the other keeps every partition
# (seen in CI: the stuck member later leaves with UnknownMemberIdError). The tests that need several
# members to share partitions run once more when that happens; twice in a row still fails.
GROUP_JOIN_RERUN = pytest.mark.flaky(reruns=1, reruns_delay=2)
