"""Durable snapshots of the learner state and the offset commits that follow them.

A snapshot is captured on the learner thread (copies) and written on its own thread, so the
learner does not wait on serialising, hashing and fsyncing ~100 MB (M = 2048 plus the replay
memory). Offsets are mirrored to Kafka only once the snapshot that covers them is durable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata

from service import metrics
from service.core.batch import tp_key
from service.core.snapshots import SnapshotStore
from service.core.state import LearnerState
from service.kafka.clients import DeadLetterWriter

log = logging.getLogger(__name__)


class Snapshotter:
    """Writes snapshots in order, one at a time, and commits the offsets each one covers.

    ``every_events``/``every_seconds`` bound the work a crash replays. ``dlq`` is flushed before
    each capture: a snapshot never covers an event whose dead letter could still be lost.
    ``settle`` is called before each capture: the head then holds every batch the offsets cover
    (the learn loop's head updates may run on a worker thread).
    """

    def __init__(self, store: SnapshotStore, consumer: KafkaConsumer, dlq: DeadLetterWriter, *,
                 every_events: int, every_seconds: float, settle: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.settle = settle
        self.consumer = consumer
        self.dlq = dlq
        self.every_events = every_events
        self.every_seconds = every_seconds
        self.since = 0  # events (and forgets) handled since the last capture
        self._last = time.monotonic()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self._inflight: Future[None] | None = None
        self._offsets: dict[str, int] | None = None  # to mirror to Kafka once durable

    def maybe_snapshot(self, state: LearnerState, *, backlog: bool) -> None:
        """Collect a durable snapshot; capture the next one when due."""
        self.collect()
        if self.since == 0:
            return
        due = time.monotonic() - self._last >= self.every_seconds
        # The event count bounds the work a crash replays. While a backlog is worked off the
        # clock bounds it as well, and a feature stream reached 5,000 events every ~2 s: each
        # ~100 MB snapshot (M = 2048 plus the memory) then took a third of a core from learning.
        if due or (self.since >= self.every_events and not backlog):
            self.snapshot(state, "periodic", wait=False)

    def snapshot(self, state: LearnerState, why: str, *, commit: bool = True, wait: bool = True) -> None:
        """Flush dead letters, capture ``state`` now, write it (in the background unless ``wait``).

        Once it is durable, and unless told not to, its offsets are mirrored to Kafka. One snapshot
        at a time, in order: a new one first waits for the one in flight. A failed write raises on
        this thread (here or at the next collection), as a crash.
        """
        self.collect(wait=True)
        start = time.perf_counter()
        self.dlq.flush()
        self.settle()
        captured = state.state_dict()  # copies: learning goes on while they are written
        self._last, self.since = time.monotonic(), 0
        self._offsets = dict(state.offsets) if commit else None
        self._inflight = self._pool.submit(self._write, captured, start, why)
        if wait:
            self.collect(wait=True)

    def _write(self, captured: dict[str, Any], start: float, why: str) -> None:
        self.store.write(captured)
        seconds = time.perf_counter() - start
        metrics.SNAPSHOT_SECONDS.observe(seconds)
        metrics.LAST_SNAPSHOT_TIMESTAMP.set(time.time())
        log.debug("snapshot (%s) in %.3f s", why, seconds)

    def collect(self, wait: bool = False) -> None:
        """Once the snapshot in flight is durable, mirror the offsets it covers."""
        future = self._inflight
        if future is None or not (wait or future.done()):
            return
        self._inflight = None
        future.result()
        if self._offsets is not None:
            self._commit(self._offsets)

    def _commit(self, covered: dict[str, int]) -> None:
        offsets = {}
        for tp in self.consumer.assignment():
            nxt = covered.get(tp_key(tp.topic, tp.partition))
            if nxt is not None:
                offsets[tp] = OffsetAndMetadata(nxt, "", -1)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets)
        except Exception as exc:  # the mirror is best effort: the snapshot is the source of truth
            log.warning("offset commit to Kafka failed (snapshot is safe): %s", exc)

    def close(self) -> None:
        """Stop the writer thread (after the last snapshot was collected)."""
        self._pool.shutdown()
