"""Durable snapshots of the learner state and the offset commits that follow them.

A snapshot is captured on the learner thread (copies) and written on its own thread, so the
learner does not wait on serialising, hashing and fsyncing ~100 MB (M = 2048 plus the replay
memory). Offsets are mirrored to Kafka only once the snapshot that covers them is durable.

A write that fails (full or read-only disk: ``OSError``) does not crash the learner: it is logged,
counted (``eddy_snapshot_failures_total``), reported as a fault (``/readyz`` details) and retried
with exponential backoff. Meanwhile ``blocked`` is true and the learn loop stops learning (nothing
is committed past the last durable snapshot), while the served model keeps answering. The first
write that succeeds clears the fault, and learning resumes from exactly where it paused.
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


class RetryBackoff:
    """Exponential backoff between retries of a failing operation: 0.5 s doubling up to ``max_seconds``."""

    def __init__(self, max_seconds: float, first: float = 0.5) -> None:
        self.max_seconds = max_seconds
        self.first = first
        self.failures = 0
        self._next = 0.0

    def failed(self) -> float:
        """Record a failure; return the seconds until the next try."""
        self.failures += 1
        delay = min(self.first * 2 ** (self.failures - 1), self.max_seconds)
        self._next = time.monotonic() + delay
        return delay

    def due(self) -> bool:
        """Whether the next try may start."""
        return time.monotonic() >= self._next

    def reset(self) -> None:
        """The operation succeeded: the next failure starts from ``first`` again."""
        self.failures = 0
        self._next = 0.0


class Snapshotter:
    """Writes snapshots in order, one at a time, and commits the offsets each one covers.

    ``every_events``/``every_seconds`` bound the work a crash replays. ``dlq`` is flushed before
    each capture: a snapshot never covers an event whose dead letter could still be lost.
    ``settle`` is called before each capture: the head then holds every batch the offsets cover
    (the learn loop's head updates may run on a worker thread).
    """

    def __init__(self, store: SnapshotStore, consumer: KafkaConsumer, dlq: DeadLetterWriter, *,
                 every_events: int, every_seconds: float, max_backoff_s: float = 30.0,
                 settle: Callable[[], None] = lambda: None) -> None:
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
        self.failure: str | None = None  # why the last write failed; None once one succeeds
        self._retry = RetryBackoff(max_seconds=max_backoff_s)

    def maybe_snapshot(self, state: LearnerState, *, backlog: bool) -> None:
        """Collect a durable snapshot; capture the next one when due."""
        self.collect()
        if self.failure is not None:
            self.retry_if_due(state)
            return
        if self.since == 0:
            return
        due = time.monotonic() - self._last >= self.every_seconds
        # The event count bounds the work a crash replays. While a backlog is worked off the
        # clock bounds it as well, and a feature stream reached 5,000 events every ~2 s: each
        # ~100 MB snapshot (M = 2048 plus the memory) then took a third of a core from learning.
        if due or (self.since >= self.every_events and not backlog):
            self.snapshot(state, "periodic", wait=False)

    @property
    def blocked(self) -> bool:
        """True while the last write failed: learning waits until a retry succeeds."""
        return self.failure is not None

    def retry_if_due(self, state: LearnerState) -> bool:
        """While ``blocked``, write ``state`` again once the backoff has passed; return whether durable now."""
        self.collect()
        if self._inflight is None and self.failure is not None and self._retry.due():
            self.snapshot(state, "retry")
        return self.failure is None

    def retry_or_wait(self, state: LearnerState, *, first: Callable[[], None], pause: float = 0.1) -> None:
        """Run ``first`` (pending admin calls), then ``retry_if_due``; sleep ``pause`` s if still not durable."""
        first()
        if not self.retry_if_due(state):
            time.sleep(pause)

    def snapshot(self, state: LearnerState, why: str, *, commit: bool = True, wait: bool = True) -> bool:
        """Flush dead letters, capture ``state`` now, write it (in the background unless ``wait``).

        Once it is durable, and unless told not to, its offsets are mirrored to Kafka. One snapshot
        at a time, in order: a new one first waits for the one in flight. Returns whether the
        snapshot is durable (always False when not waited for). A failed write (``OSError``) is
        reported and retried (class docstring); any other error raises on this thread, as a crash.
        """
        self.collect(wait=True)
        start = time.perf_counter()
        self.dlq.flush()
        self.settle()
        captured = state.state_dict()  # copies: learning goes on while they are written
        self._last, self.since = time.monotonic(), 0
        self._offsets = dict(state.offsets) if commit else None
        self._inflight = self._pool.submit(self._write, captured, start, why)
        return self.collect(wait=True) if wait else False

    def _write(self, captured: dict[str, Any], start: float, why: str) -> None:
        self.store.write(captured)
        seconds = time.perf_counter() - start
        metrics.SNAPSHOT_SECONDS.observe(seconds)
        metrics.LAST_SNAPSHOT_TIMESTAMP.set(time.time())
        log.debug("snapshot (%s) in %.3f s", why, seconds)

    def collect(self, wait: bool = False) -> bool:
        """Once the snapshot in flight is durable, mirror the offsets it covers; return whether one landed.

        A failed write is recorded (``failure``) instead: its offsets are not committed.
        """
        future = self._inflight
        if future is None or not (wait or future.done()):
            return False
        self._inflight = None
        try:
            future.result()
        except OSError as exc:
            self._failed(exc)
            return False
        if self.failure is not None:
            log.warning("snapshot written again after %d failed attempts; learning resumes", self._retry.failures)
            self.failure = None
            self._retry.reset()
            metrics.set_fault("snapshot", None)
        if self._offsets is not None:
            self._commit(self._offsets)
        return True

    def _failed(self, exc: OSError) -> None:
        delay = self._retry.failed()
        self.failure = f"snapshot write failed ({exc.strerror or exc}: {exc.filename or self.store.root})"
        self.since = max(self.since, 1)  # the state is still not durable
        metrics.SNAPSHOT_FAILURES.inc()
        metrics.set_fault("snapshot", f"{self.failure}; learning paused, retry in {delay:.1f} s")
        log.error("%s; learning paused, serving goes on, retry %d in %.1f s",
                  self.failure, self._retry.failures, delay)

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
