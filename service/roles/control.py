"""Forget requests in scale-out mode: every replica follows the whole control topic.

A forget request names ids or a label, not partitions, so every learner replica reads every record
of ``kafka.control_topic`` (a group-less consumer, assigned every partition) and applies it to each
source partition it owns, with the single-process rules (``service.core.forget.apply_forget``): ids
found in the partition's id window are re-read from that partition and subtracted exactly, a label
forget removes the label's events from the partition, forgotten ids are tombstoned in the
partition's state.

Exactly once per partition: a partition state records, in ``state.offsets`` under
``"<control topic>:<cp>"``, the next control offset it has to apply, exactly as it records its event
offset. Both are in the one record a replica publishes, so a state either contains a forget and
the offset past it, or neither. A partition restored elsewhere (after a rebalance or a SIGKILL)
applies the control records after its recorded offset: nothing is applied twice or lost. The
follower therefore reads from the lowest offset any owned partition still needs.

Unknown ids are not counted here (each partition knows only its own ids): a partition keeps its
own ``forget_unknown`` and the number of ids named (``forget_named``), and the merger derives one
global count from them (``service.roles.forget_view``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from service import metrics
from service.core.batch import Embed, Record, tp_key
from service.core.events import Event, decode
from service.core.forget import ForgetRequest, Refetch, apply_forget, parse_control
from service.errors import EddyError
from service.kafka.clients import DeadLetterWriter
from service.kafka.deltas import assign_all
from service.roles.partitions import PartitionState

log = logging.getLogger(__name__)

# An idle poll costs ~0.7 ms here (kafka-python, loaded 2-core machine); a replica's step can be a
# few ms when it keeps up, so the control topic is polled at most 20 times a second.
POLL_EVERY_S = 0.05


@dataclass(frozen=True)
class ControlOptions:
    """Plain settings of the control follower."""

    control_topic: str
    dim: int
    max_event_bytes: int


class ControlFollower:
    """Reads the control topic and applies each forget request once to every owned partition state."""

    def __init__(self, consumer: KafkaConsumer, *, dlq: DeadLetterWriter, refetch: Refetch,
                 embed: Embed | None, options: ControlOptions) -> None:
        self.consumer = consumer
        self.dlq = dlq
        self.refetch = refetch
        self.embed = embed
        self.opt = options
        self._tps: list[TopicPartition] = []
        self._last_poll = 0.0

    def start(self) -> None:
        """Assign every partition of the control topic (positioned at the beginning)."""
        self._tps = assign_all(self.consumer, self.opt.control_topic)

    def rewind(self, parts: Sequence[PartitionState]) -> None:
        """Position each control partition at the lowest offset an owned partition has not applied."""
        if not parts:
            return
        for tp in self._tps:
            key = tp_key(tp.topic, tp.partition)
            needed = min(part.state.offsets.get(key, 0) for part in parts)
            if needed == 0:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, needed)

    def step(self, parts: Sequence[PartitionState]) -> int:
        """Apply what arrived on the control topic to ``parts``; return how many records changed a state."""
        now = time.monotonic()
        if now - self._last_poll < POLL_EVERY_S:
            return 0
        self._last_poll = now
        polled = self.consumer.poll(timeout_ms=0)
        applied = 0
        for tp, msgs in sorted(polled.items(), key=lambda kv: kv[0].partition):
            for m in msgs:
                rec = Record(tp.topic, tp.partition, m.offset, m.value, tuple(m.headers or ()))
                applied += self.apply(rec, parts)
        return applied

    def apply(self, rec: Record, parts: Sequence[PartitionState]) -> int:
        """Apply one control record to each of ``parts`` that has not applied it yet; 1 if any had to.

        An invalid record is dead-lettered and still moves the partitions' control offsets (as in
        single-process mode): it is handled, once.
        """
        key = tp_key(rec.topic, rec.partition)
        todo = [part for part in parts if part.state.offsets.get(key, 0) <= rec.offset]
        if not todo:
            return 0
        request = parse_control(rec.value)
        if isinstance(request, str):
            log.warning("control message at %s offset %d ignored: %s", key, rec.offset, request)
            self._dead_letter(rec, "bad_control", request)
        for part in todo:
            if not isinstance(request, str):
                self._forget(part, request, rec)
            part.state.offsets[key] = rec.offset + 1
            part.changed = True
        return 1

    def _forget(self, part: PartitionState, request: ForgetRequest, rec: Record) -> None:
        reread = RereadRows(self.refetch, self.embed, self.opt.dim, self.opt.max_event_bytes)
        try:
            result = apply_forget(part.state, request, refetch=reread.refetch,
                                  embed=reread.embed if self.embed is not None else None,
                                  dim=self.opt.dim, max_event_bytes=self.opt.max_event_bytes)
        except (ValueError, EddyError, KafkaError) as exc:
            # Re-reading and embedding happen before any state changes, so the state is intact.
            log.error("forget request at %s:%d offset %d failed for partition %d: %s", rec.topic, rec.partition,
                      rec.offset, part.partition, exc)
            metrics.DEAD_LETTERS.labels(reason="forget_failed").inc()
            self._dead_letter(rec, "forget_failed", str(exc)[:500])
            return
        # result.unknown counts the ids that are not in THIS partition: it stays in the partition's
        # counters, and the merger turns all partitions' counts into one (forget_view).
        part.forget_named += len(dict.fromkeys(request.ids))
        if request.label is not None:
            part.drop_recent_label(request.label)
        if result.forgotten:  # the record must not carry forgotten events' rows either
            part.drop_recent_rows(reread.rows())
        metrics.EVENTS.labels(result="forgotten").inc(result.forgotten)
        log.info("partition %d: forget at control offset %d removed %d events", part.partition, rec.offset,
                 result.forgotten)

    def _dead_letter(self, rec: Record, reason: str, detail: str) -> None:
        # Every replica sees the record; the DLQ is compacted by topic:partition:offset, so repeats collapse.
        self.dlq.send(rec.value, reason=reason, detail=detail, topic=rec.topic, partition=rec.partition,
                      offset=rec.offset, headers=list(rec.headers))



class RereadRows:
    """Wraps a forget's re-reading and embedding to keep the rows of the events it re-read.

    A partition's published record carries its recent rows (the merger's gate window); the rows of
    forgotten events must leave it too, and the recent rows have no ids, so they are matched by value.
    """

    def __init__(self, refetch: Refetch, embed: Embed | None, dim: int, max_event_bytes: int) -> None:
        self._refetch = refetch
        self._embed = embed
        self.dim = dim
        self.max_event_bytes = max_event_bytes
        self._raw: list[bytes] = []
        self._embedded: list[np.ndarray] = []

    def refetch(self, locations: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes | None]:
        """``refetch``, remembering what it returned."""
        found = self._refetch(locations)
        self._raw.extend(v for v in found.values() if v is not None)
        return found

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``embed``, remembering what it returned."""
        assert self._embed is not None
        X = self._embed(texts)
        self._embedded.append(np.asarray(X, np.float32))
        return X

    def rows(self) -> np.ndarray:
        """Feature rows of the re-read feature events and embeddings of the re-read texts, ``(n, dim)``."""
        blocks = list(self._embedded)
        for raw in self._raw:
            event = decode(raw, dim=self.dim, max_bytes=self.max_event_bytes)
            if isinstance(event, Event) and event.features is not None:
                blocks.append(np.asarray(event.features, np.float32)[None, :])
        return np.concatenate(blocks) if blocks else np.zeros((0, self.dim), np.float32)
