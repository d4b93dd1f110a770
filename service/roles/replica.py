"""Scale-out learning: a learner replica keeps one state per source partition and publishes it whole.

Run several ``eddy serve --role learn`` processes with ``kafka.scale_out = true`` in one consumer
group; Kafka spreads the partitions of the events topic over them. For every partition ``p`` it
owns, a replica keeps its own ``LearnerState`` (head, id window, counters, offset of ``p``) and
learns ``p``'s events into it only. Every ``checkpoint.every_events`` events / ``every_seconds``
seconds, as soon as a partition sees a new class, on revocation and on shutdown, it publishes the
CUMULATIVE state of each changed partition to the compacted deltas topic (see ``service.kafka.deltas``)
and, once Kafka acknowledged those records, commits the partitions' offsets to the group.

The published record is the partition's checkpoint: on assignment a replica reads the best record
of each new partition, restores it, and seeks to its ``next_offset`` (the beginning if there is
none). A SIGKILLed replica therefore loses nothing: its partitions move, with their states, to the
survivors, which replay only the events after the last published state; the merger
(``service.roles.merger``) sums exactly one state per partition, so nothing is counted twice.

Forget requests: every replica follows the whole control topic and applies each request to the
partitions it owns (``service.roles.control``); the control offset a partition state has applied is
part of its published record, so a request is applied exactly once per partition across crashes
and rebalances, and a forget is published at once (like a new class).

Limits of this mode: no replay memory (per-partition memories would not merge into one index), and
duplicate ids are only detected within a partition (producers should key events by id so that
retries land in the same partition).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from service import metrics
from service.core.batch import Embed, Record, learn_batch, report, tp_key
from service.core.recent_rows import RecentRows
from service.core.snapshots import pack, unpack
from service.core.state import LearnerState
from service.errors import BackboneUnavailable, BrokerError
from service.kafka.clients import DeadLetterWriter, RebalanceCallbacks, broker_reachable, subscribe
from service.kafka.deltas import DeltaRecord, delta_headers, summarize
from service.roles.control import ControlFollower
from service.roles.partitions import PartitionState
from service.roles.progress import Interval, consumer_lag

log = logging.getLogger(__name__)

Restore = Callable[[Collection[str]], dict[str, DeltaRecord]]
# Called with "forget_applied" (a forget is applied, not yet published) and "forget_published";
# crash tests SIGKILL the replica there (service.app.wiring.fault_hook).
ForgetHook = Callable[[str], None]

__all__ = ["PartitionState", "PartitionedLearnLoop", "ScaleOutOptions", "replica_id"]


@dataclass(frozen=True)
class ScaleOutOptions:
    """Plain settings of a learner replica."""

    topic: str
    deltas_topic: str
    dim: int
    max_event_bytes: int
    batch_max_events: int
    poll_timeout_ms: int
    publish_every_events: int
    publish_every_seconds: float
    log_every_seconds: float
    recent_rows: int
    replica_id: str
    max_classes: int | None = None  # per partition state: new labels past it are dead-lettered
    unknown_label: str | None = None  # events with this label are never learned


class PartitionedLearnLoop:
    """Owns the consumer and one state per assigned partition; ``run`` until ``stop`` is set."""

    def __init__(self, *, consumer: KafkaConsumer, producer: KafkaProducer, dlq: DeadLetterWriter,
                 restore: Restore, new_state: Callable[[], LearnerState], embed: Embed | None,
                 options: ScaleOutOptions, control: ControlFollower | None = None,
                 forget_hook: ForgetHook | None = None) -> None:
        self.consumer = consumer
        self.control = control
        self.forget_hook = forget_hook
        self._forget_unpublished = False
        self.producer = producer
        self.dlq = dlq
        self.restore = restore
        self.new_state = new_state
        self.embed = embed
        self.opt = options
        self.parts: dict[int, PartitionState] = {}
        self.owned: set[int] = set()
        self._pending: list[TopicPartition] = []  # assigned, paused, not yet restored
        self.published = 0
        self._since_publish = 0
        self._publish_soon = False
        self._last_publish = time.monotonic()
        self._log_timer = Interval(options.log_every_seconds)
        self._log_learned = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then publish what changed and return."""
        subscribe(self.consumer, [self.opt.topic], listener=RebalanceCallbacks(self.revoke, self.assigned))
        if self.control is not None:
            self.control.start()
        while not stop.is_set():
            try:
                self.step()
            except BackboneUnavailable:
                if not stop.is_set():
                    raise  # nothing published: the merger keeps the last consistent delta
                log.info("stopping before the backbone loaded; unlearned events are replayed on restart")
        self.publish("shutdown")

    def step(self) -> None:
        """One poll-learn-maybe-publish cycle."""
        polled = self.consumer.poll(timeout_ms=self.opt.poll_timeout_ms, max_records=self.opt.batch_max_events)
        now = time.time()
        for tp, msgs in polled.items():
            if tp.topic != self.opt.topic or tp.partition not in self.owned:
                continue  # fetched before a revocation: the new owner reads them again
            records = [Record(tp.topic, tp.partition, m.offset, m.value, tuple(m.headers or ()), now) for m in msgs]
            self._learn(self.parts[tp.partition], records)
        if self._pending:  # after learning: records fetched for them before the seek are dropped
            self.take_over()
        if self.control is not None:
            self._follow_control(self.control)
        self._maybe_publish()
        self._maybe_log()

    def _learn(self, part: PartitionState, records: list[Record]) -> None:
        start = time.perf_counter()
        out = learn_batch(part.state, records, embed=self.embed, dim=self.opt.dim,
                          max_event_bytes=self.opt.max_event_bytes, max_classes=self.opt.max_classes,
                          unknown_label=self.opt.unknown_label)
        report(out, self.dlq, time.perf_counter() - start)
        if out.X is not None and out.learned:
            part.recent.extend(out.X, out.labels)
        part.changed = True  # the offset moved, whatever the records' fate
        self._publish_soon = self._publish_soon or bool(out.new_classes)
        self._since_publish += len(records)
        self._log_learned += out.learned

    def _follow_control(self, control: ControlFollower) -> None:
        if control.step([self.parts[p] for p in sorted(self.owned)]):
            self._publish_soon = True  # a forget must reach the merged model at once
            self._since_publish += 1
            self._forget_unpublished = True
            if self.forget_hook is not None:
                self.forget_hook("forget_applied")

    # -- publishing --------------------------------------------------------------------------
    def _maybe_publish(self) -> None:
        if self._since_publish == 0:
            return
        due = time.monotonic() - self._last_publish >= self.opt.publish_every_seconds
        if due or self._publish_soon or self._since_publish >= self.opt.publish_every_events:
            self.publish("periodic")

    def publish(self, why: str, *, commit: bool = True) -> int:
        """Publish every changed owned partition's cumulative state, then commit their offsets.

        Dead letters are flushed first, and offsets are committed only after Kafka acknowledged
        the states that cover them. Raises ``BrokerError`` if a state was not written (the caller
        must stop: committing or continuing would let the group move past unpublished events).
        Returns the number of records published. ``commit=False`` skips the commit (inside a
        rebalance callback kafka-python 3 cannot commit; the next owner commits on take-over).
        """
        changed = [self.parts[p] for p in sorted(self.owned) if self.parts[p].changed]
        self._since_publish, self._publish_soon = 0, False
        self._last_publish = time.monotonic()
        if not changed:
            return 0
        start = time.perf_counter()
        self.dlq.flush()
        sent = []
        for part in changed:
            part.seq += 1
            nxt = part.next_offset(self.opt.topic) or 0
            value = pack(part.payload(self.opt.topic, self.opt.replica_id))
            future = self.producer.send(self.opt.deltas_topic, key=tp_key(self.opt.topic, part.partition).encode(),
                                        value=value, headers=delta_headers(nxt, part.seq))
            sent.append((part, nxt, future))
        try:
            for part, _, future in sent:
                future.get(timeout=120)
                part.changed = False
        except KafkaError as exc:
            raise BrokerError(f"publishing partition states to {self.opt.deltas_topic} failed: "
                              f"{type(exc).__name__}: {exc}") from None
        self.published += len(sent)
        seconds = time.perf_counter() - start
        metrics.SNAPSHOT_SECONDS.observe(seconds)
        metrics.LAST_SNAPSHOT_TIMESTAMP.set(time.time())
        log.debug("published %d partition states (%s) in %.3f s", len(sent), why, seconds)
        if commit:
            self._commit({TopicPartition(self.opt.topic, part.partition): nxt for part, nxt, _ in sent})
        if self._forget_unpublished:
            self._forget_unpublished = False
            if self.forget_hook is not None:
                self.forget_hook("forget_published")
        return len(sent)

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except Exception as exc:  # the mirror is best effort: the published states are the truth
            log.warning("offset commit to Kafka failed (published states are safe): %s", exc)

    # -- rebalancing -------------------------------------------------------------------------
    def revoke(self, partitions: list[TopicPartition]) -> None:
        """Publish what changed, then stop owning ``partitions`` (their states stay parked)."""
        self.publish("revoke", commit=False)
        self._pending = [tp for tp in self._pending if tp not in partitions]
        for tp in partitions:
            if tp.topic == self.opt.topic:
                self.owned.discard(tp.partition)
                with contextlib.suppress(KeyError):  # no lag was reported for it yet
                    metrics.CONSUMER_LAG.remove(str(tp.partition))

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """Note newly assigned partitions and pause them until ``take_over`` restores them.

        Runs inside the rebalance callback, which in kafka-python 3 blocks the client's event loop
        (heartbeats included): reading the deltas topic there can outlast the session timeout and
        start a rebalance storm, so the slow part waits for the loop thread.
        """
        tps = [tp for tp in partitions if tp.topic == self.opt.topic]
        if tps:
            self.consumer.pause(*tps)
        self._pending = tps

    def take_over(self) -> None:
        """Own the pending partitions: restore each from its best published state, seek, resume."""
        tps, self._pending = self._pending, []
        keys = [tp_key(tp.topic, tp.partition) for tp in tps]
        latest = self.restore(keys) if keys else {}
        log.info("assigned partitions %s; published states: %s", sorted(tp.partition for tp in tps),
                 summarize(latest))
        for tp in tps:
            part = self._adopt(tp.partition, latest.get(tp_key(tp.topic, tp.partition)))
            self.parts[tp.partition] = part
            self.owned.add(tp.partition)
            nxt = part.next_offset(self.opt.topic)
            if nxt is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, nxt)
        for p in [p for p in self.parts if p not in self.owned]:
            del self.parts[p]  # parked states of partitions now owned elsewhere would go stale
        if tps:
            self.consumer.resume(*tps)
        if self.control is not None:  # restored states apply the forgets after their control offsets
            self.control.rewind([self.parts[p] for p in sorted(self.owned)])
        restored = {tp: self.parts[tp.partition].next_offset(self.opt.topic) for tp in tps}
        self._commit({tp: nxt for tp, nxt in restored.items() if nxt is not None})  # states already acked

    def _adopt(self, partition: int, record: DeltaRecord | None) -> PartitionState:
        parked = self.parts.get(partition)
        if parked is not None and not parked.changed:
            nxt = parked.next_offset(self.opt.topic)
            if (record is None and nxt is None) or (
                    record is not None and (nxt, parked.seq) == (record.next_offset, record.seq)):
                return parked  # what we published last is still the newest: no need to unpack it
        state = self.new_state()
        recent = RecentRows(self.opt.recent_rows, self.opt.dim)
        if record is None:
            return PartitionState(partition, state, recent)
        payload = unpack(record.value)
        if int(payload["partition"]) != partition:
            raise ValueError(f"deltas record {record.key} holds partition {payload['partition']}")
        identity = state.backbone_identity
        state.restore(payload)
        if identity and state.backbone_identity != identity:
            log.warning("partition %d was learned with backbone %s; this replica runs %s", partition,
                        state.backbone_identity, identity)
        rows = payload.get("recent") or {}
        if len(rows.get("labels", [])):
            recent.extend(np.asarray(rows["X"], np.float32), list(rows["labels"]))
        log.info("partition %d restored at offset %d (%d events learned, seq %d, from %s)", partition,
                 record.next_offset, state.counters.learned, record.seq, payload.get("replica"))
        return PartitionState(partition, state, recent, seq=record.seq,
                              forget_named=int(payload.get("forget_named", 0)))

    # -- observability -----------------------------------------------------------------------
    def _maybe_log(self) -> None:
        dt = self._log_timer.elapsed_if_due()
        if dt is None:
            return
        lag = consumer_lag(self.consumer, self.opt.topic, sorted(self.owned),
                           lambda p: self.parts[p].next_offset(self.opt.topic))
        metrics.set_broker_up(broker_reachable(self.consumer))
        log.info("replica %s: partitions %s  learned %.0f/s  lag %d  published %d", self.opt.replica_id,
                 sorted(self.owned), self._log_learned / dt, lag, self.published)
        self._log_learned = 0


def replica_id() -> str:
    """``host-pid``: names the publisher of a state in logs and in the record."""
    return f"{socket.gethostname()}-{os.getpid()}"
