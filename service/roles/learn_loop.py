"""The learn loop: consume a batch, learn it, export on schedule, snapshot, commit offsets.

One thread owns the learner state. Its cycle::

    poll -> learn_batch (bad events -> dead-letter topic) -> forget requests
         -> every N events / T seconds, if changed: export -> gates -> swap
         -> every N events / T seconds: flush dead letters -> capture the state (copies)
            -> write it durably (snapshot thread) -> commit its offsets (mirror)

The head's update of a batch runs on a worker thread (``HeadAhead``) while this thread goes on
to the memory, the id window and the next poll and decode; every reader of the head (snapshot,
export, forget, admin call) settles it first, so the stages keep their order.

Offsets move to Kafka only after a snapshot covers them; on start and on every partition
assignment the consumer seeks to the snapshot's offsets. A crash therefore replays exactly the
events after the last snapshot into the state of that snapshot: nothing is lost or counted twice.
Dead letters written after the last snapshot are written again on replay with the same key
(``topic:partition:offset``), so DLQ consumers can drop repeats by key (the DLQ is compacted).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from service import metrics
from service.core.batch import Embed, Predict, Record, Reject, learn_batch, report, texts_of, tp_key
from service.core.forget import Refetch, apply_forget, parse_control
from service.core.recent_rows import RecentRows
from service.core.snapshots import SnapshotStore
from service.core.state import LearnerState
from service.errors import BackboneUnavailable, EddyError
from service.kafka.clients import DeadLetterWriter, RebalanceCallbacks, broker_reachable, subscribe
from service.models.exporter import Exporter
from service.roles.embed_ahead import EmbedAhead
from service.roles.exports import ExportPolicy, ExportScheduler
from service.roles.head_ahead import HeadAhead
from service.roles.progress import Interval, assigned_partitions, consumer_lag, offsets_lookup
from service.roles.snapshots import Snapshotter
from service.roles.tasks import TaskQueue

log = logging.getLogger(__name__)

# A poll returns all that kafka-python has buffered (bounded by max_partition_fetch_bytes per
# partition); LearnLoop.step says why.
POLL_ALL = 1 << 30


@dataclass(frozen=True)
class LoopOptions:
    """Plain settings of the learn loop."""

    topic: str
    control_topic: str
    dim: int
    max_event_bytes: int
    batch_max_events: int
    poll_timeout_ms: int
    export_every_events: int
    export_every_seconds: float
    snapshot_every_events: int
    snapshot_every_seconds: float
    log_every_seconds: float
    holdout_size: int
    gcv_every_seconds: float
    head_label: str
    retry_backoff_max_s: float = 5.0
    max_classes: int | None = None  # new labels past it are dead-lettered (too_many_classes)
    unknown_label: str | None = None  # events with this label are never learned (they check rejection)
    reject_rate: float | None = None  # serving.unknown.reject_rate (None: unknown detection off)


class LearnLoop:
    """Owns the consumer and the learner state; ``run`` until ``stop`` is set.

    Its collaborators each own one duty: ``exports`` (when to export, the export thread),
    ``snapshots`` (durable state, offset commits) and ``embed_ahead`` (the next batch's texts).
    """

    def __init__(self, *, consumer: KafkaConsumer, dlq: DeadLetterWriter, state: LearnerState,
                 store: SnapshotStore, exporter: Exporter | None, embed: Embed | None, refetch: Refetch,
                 options: LoopOptions, predict: Predict | None = None, reject: Reject | None = None) -> None:
        self.consumer = consumer
        self.dlq = dlq
        self.state = state
        self.embed = embed  # forget's re-embedding calls it directly
        self._head = HeadAhead()  # the head's math overlaps the next batch's polling and decoding
        self._embed_ahead = EmbedAhead(embed, options.dim) if embed is not None else None
        self.refetch = refetch
        self.opt = options
        self.predict = predict
        self.reject = reject
        self.recent = RecentRows(options.holdout_size, options.dim)
        policy = ExportPolicy(options.export_every_events, options.export_every_seconds, options.gcv_every_seconds,
                              options.reject_rate)
        self.exports = ExportScheduler(exporter, policy, settle=self._head.settle)
        self.snapshots = Snapshotter(store, consumer, dlq, every_events=options.snapshot_every_events,
                                     every_seconds=options.snapshot_every_seconds, settle=self._head.settle)
        self._backlog = False  # more is waiting than one batch holds
        self._buffered: deque[Record] = deque()  # polled, not yet learned (learned before the next poll)
        self._outage_backoff = 0.0
        self._revoked = False  # set on kafka-python's IO thread; the snapshot runs on ours
        self._last_outage_log = 0.0
        self._log_timer = Interval(options.log_every_seconds)
        self._log_counts = {"learned": 0, "dead_letter": 0, "duplicate": 0}
        self.correct = self.predicted = 0
        self._tasks = TaskQueue(before_each=self._head.settle)  # admin calls may read the head

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the learner thread between batches (admin RPCs); returns its future."""
        return self._tasks.submit(fn)

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then snapshot and return."""
        subscribe(self.consumer, [self.opt.topic, self.opt.control_topic],
                  listener=RebalanceCallbacks(self._on_revoked, self.seek_to_state))
        try:
            while not stop.is_set():
                try:
                    self.step()
                except BackboneUnavailable:
                    if not stop.is_set():
                        raise
                    # Stopping before the backbone loaded: the batch changed nothing, the next
                    # process learns it from the snapshot's offsets.
                    log.info("stopping before the backbone loaded; unlearned events are replayed on restart")
            self._head.settle()  # the last update's failure, if any, is a crash: no shutdown snapshot
        except BaseException:
            # No snapshot of a half-applied batch: a restart replays from the last good snapshot.
            self.exports.close(None)
            raise
        finally:
            if self._embed_ahead is not None:  # no thread left inside the encoder at exit
                self._embed_ahead.close()
            self._head.close()  # after a failure too: no thread left inside the head
        self.exports.close(self.state)
        self.snapshot("shutdown")  # if it fails (reported), a restart replays from the last durable one
        self.snapshots.close()

    def step(self) -> None:
        """One poll-learn-maybe-export-maybe-snapshot cycle.

        A poll takes every record kafka-python has buffered, and each step learns at most
        ``batch_max_events`` of them; the next poll waits until they are all learned. Why: with
        records left in its buffer, kafka-python 3.0.12 sends the next fetch for the other
        partitions alone (the control topic's, which is empty), and the broker holds that
        request for ``fetch.max.wait.ms`` (500 ms) before the events partition can be fetched
        again. Leaving half of each fetch buffered made the daemon 3-10x slower than a bare
        consumer (bench/throughput.py).
        """
        if self.snapshots.blocked:  # the disk failed: serve, answer admin calls, learn nothing until it is back
            return self.snapshots.retry_or_wait(self.state, first=self._tasks.run_pending)
        if not self._buffered and not self._poll():
            return
        events = [self._buffered.popleft() for _ in range(min(self.opt.batch_max_events, len(self._buffered)))]
        if self._embed_ahead is not None and self._buffered:
            upcoming = list(islice(self._buffered, self.opt.batch_max_events))
            self._embed_ahead.queue_next(texts_of(upcoming, dim=self.opt.dim, max_event_bytes=self.opt.max_event_bytes))
        if events:
            self._learn(events)
        # Behind by more than a batch: in our buffer, or on the broker (the last fetch's high
        # watermark). A poll's size alone misses it when a fetch holds less than a batch.
        self._backlog = bool(self._buffered) or self._lag() >= self.opt.batch_max_events
        self._tasks.run_pending()
        self.exports.maybe_export(self.state, self.recent, backlog=self._backlog)
        self.snapshots.maybe_snapshot(self.state, backlog=self._backlog)
        self._maybe_log()

    def _poll(self) -> bool:
        """Poll everything kafka-python has buffered: events into ``_buffered``, control records applied.

        Returns False when the broker could not be reached (already reported and backed off).
        """
        try:
            polled = self.consumer.poll(timeout_ms=self.opt.poll_timeout_ms, max_records=POLL_ALL)
        except KafkaError as exc:
            self._broker_trouble(exc)
            return False
        self._outage_backoff = 0.0
        if self._revoked:
            self._revoked = False
            self.snapshot("revoke", commit=False)
        now = time.time()
        for tp, msgs in polled.items():
            for m in msgs:
                rec = Record(tp.topic, tp.partition, m.offset, m.value, tuple(m.headers or ()), now)
                if tp.topic == self.opt.control_topic:
                    self._control(rec)
                else:
                    self._buffered.append(rec)
        return True

    def _broker_trouble(self, exc: Exception) -> None:
        """The broker is unreachable: report it, keep serving and answering admin calls, back off."""
        metrics.set_broker_up(False)
        now = time.monotonic()
        if now - self._last_outage_log > self.opt.log_every_seconds:
            self._last_outage_log = now
            log.warning("Kafka unreachable (%s); predictions go on, retrying with backoff", exc)
        self._tasks.run_pending()
        self._outage_backoff = min(max(2 * self._outage_backoff, 0.1), self.opt.retry_backoff_max_s)
        time.sleep(self._outage_backoff)

    # -- learning ----------------------------------------------------------------------------
    def _learn(self, records: list[Record]) -> None:
        start = time.perf_counter()
        out = learn_batch(self.state, records, embed=self._embed_ahead, dim=self.opt.dim,
                          max_event_bytes=self.opt.max_event_bytes, predict=self.predict,
                          max_classes=self.opt.max_classes, unknown_label=self.opt.unknown_label,
                          reject=self.reject, head_updates=self._head)
        report(out, self.dlq, time.perf_counter() - start)
        self.correct += out.correct
        self.predicted += out.predicted
        changed = out.X is not None and out.learned > 0
        if changed:
            assert out.X is not None
            self.recent.extend(out.X, out.labels)
        if out.new_classes:  # the head may still be learning them (HeadAhead)
            metrics.CLASSES.set(out.n_classes or 0)
        self.exports.note_learned(len(records), changed=changed, new_class=bool(out.new_classes),
                                  received_at=records[0].received_at)
        self.snapshots.since += len(records)
        for key, n in (("learned", out.learned), ("dead_letter", len(out.dead_letters)),
                       ("duplicate", out.duplicates)):
            self._log_counts[key] += n

    def _control(self, rec: Record) -> None:
        key = tp_key(rec.topic, rec.partition)
        if rec.offset < self.state.offsets.get(key, 0):
            return
        self.state.offsets[key] = rec.offset + 1
        request = parse_control(rec.value)
        if isinstance(request, str):
            log.warning("control message at %s offset %d ignored: %s", key, rec.offset, request)
            self.dlq.send(rec.value, reason="bad_control", detail=request, topic=rec.topic,
                          partition=rec.partition, offset=rec.offset, headers=list(rec.headers))
            return
        try:
            self.forget(request)
        except BackboneUnavailable:
            self.state.offsets[key] = rec.offset  # not applied: whoever runs next applies it
            raise
        except (ValueError, EddyError, KafkaError) as exc:
            # Re-reading and embedding happen before any state changes, so the state is intact.
            log.error("forget request at %s offset %d failed: %s", key, rec.offset, exc)
            metrics.DEAD_LETTERS.labels(reason="forget_failed").inc()
            self.dlq.send(rec.value, reason="forget_failed", detail=str(exc)[:500], topic=rec.topic,
                          partition=rec.partition, offset=rec.offset, headers=list(rec.headers))

    def forget(self, request: Any) -> dict[str, Any]:
        """Apply a forget request now (also used by the admin RPC) and export the result."""
        self._head.settle()
        result = apply_forget(self.state, request, refetch=self.refetch, embed=self.embed,
                              dim=self.opt.dim, max_event_bytes=self.opt.max_event_bytes, recent=self.recent)
        metrics.EVENTS.labels(result="forgotten").inc(result.forgotten)
        metrics.FORGET_UNKNOWN_IDS.inc(result.unknown)
        self.snapshots.since += 1
        if result.forgotten or result.memory_removed:
            metrics.CLASSES.set(len(self.state.head.classes_))
            self.exports.note_forgotten()
        return vars(result)

    # -- export and snapshot entry points (admin RPCs, shutdown) ------------------------------
    def pause_exports(self) -> None:
        """Stop automatic exports (after a rollback) once any export in flight has landed."""
        self.exports.pause(self.state)

    def export_now(self) -> int | None:
        """Export the current head through the gates now and wait; return the applied version, if any."""
        return self.exports.export_now(self.state, self.recent)

    def snapshot(self, why: str, *, commit: bool = True, wait: bool = True) -> bool:
        """Write the state durably now (see ``Snapshotter.snapshot``); return whether it is durable."""
        return self.snapshots.snapshot(self.state, why, commit=commit, wait=wait)

    # -- rebalancing -------------------------------------------------------------------------
    def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        # kafka-python 3 calls this on its IO thread, where blocking work stalls heartbeats; the learner
        # thread snapshots as soon as poll returns. Only this process reads its snapshots, so the
        # partitions moving meanwhile cannot make anyone resume from a stale state.
        if revoked:
            self._revoked = True

    def seek_to_state(self, partitions: list[TopicPartition]) -> None:
        """Position assigned partitions at the offsets the state covers (or the beginning)."""
        known = {tp: self.state.offsets.get(tp_key(tp.topic, tp.partition)) for tp in partitions}
        for tp, nxt in known.items():
            if nxt is not None:
                self.consumer.seek(tp, nxt)
        if fresh := [tp for tp, nxt in known.items() if nxt is None]:
            self.consumer.seek_to_beginning(*fresh)

    # -- observability -----------------------------------------------------------------------
    def _lag(self) -> int:
        return consumer_lag(self.consumer, self.opt.topic, assigned_partitions(self.consumer, self.opt.topic),
                            offsets_lookup(self.state.offsets, self.opt.topic))

    def _maybe_log(self) -> None:
        dt = self._log_timer.elapsed_if_due()
        if dt is None:
            return
        lag = self._lag()
        metrics.set_broker_up(broker_reachable(self.consumer))
        if self.predicted:
            metrics.PREQUENTIAL_ACCURACY.labels(head=self.opt.head_label).set(self.correct / self.predicted)
        self._head.settle()  # the batch in flight too: the gauge never steps back
        metrics.CLASSES.set(len(self.state.head.classes_))
        if self.state.memory is not None:
            metrics.MEMORY_ITEMS.set(len(self.state.memory))
            metrics.MEMORY_BYTES.set(self.state.memory.nbytes)
        c = self._log_counts
        acc = f"{self.correct / self.predicted:.3f}" if self.predicted else "-"
        log.info("learned %.0f/s  dead-letter %.1f/s  duplicates %d  lag %d  classes %d  model v%d  acc %s",
                 c["learned"] / dt, c["dead_letter"] / dt, c["duplicate"], lag,
                 len(self.state.head.classes_), self.state.model_version, acc)
        self._log_counts = dict.fromkeys(c, 0)
        self.correct = self.predicted = 0
