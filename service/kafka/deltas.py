"""The deltas topic: one compacted record per source partition, holding that partition's whole state.

A learner replica in scale-out mode publishes, for every source partition ``p`` it owns, the
CUMULATIVE learner state of ``p`` (head statistics, id window, counters, a few recent rows) up to
``next_offset``: key ``"<events topic>:<p>"``, value ``service.core.snapshots.pack(...)``, headers
``eddy.next_offset`` and ``eddy.seq`` (decimal ASCII) so a reader can rank records without
unpacking them. Because every head is a sum of per-event statistics and learning is
deterministic, the state of ``p`` is a function of ``next_offset`` alone: republishing is
idempotent, the record doubles as the checkpoint of ``p``, and of several records for ``p`` the one
with the highest ``(next_offset, seq)`` is always the right one to keep. A zombie replica that
publishes an older state therefore cannot move a partition backwards.

Compaction keeps one record per key, so the topic stays about ``partitions x state size``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, TopicAlreadyExistsError

from service.errors import BrokerError
from service.kafka.clients import PLAINTEXT, ClientSecurity

log = logging.getLogger(__name__)

NEXT_OFFSET_HEADER = "eddy.next_offset"
SEQ_HEADER = "eddy.seq"


@dataclass(frozen=True, slots=True)
class DeltaRecord:
    """One record of the deltas topic, ranked but not yet unpacked."""

    key: str
    next_offset: int
    seq: int
    value: bytes

    @property
    def rank(self) -> tuple[int, int]:
        """Higher is newer: ``(next_offset, seq)``."""
        return self.next_offset, self.seq


def delta_headers(next_offset: int, seq: int) -> list[tuple[str, bytes]]:
    """Headers of a published state."""
    return [(NEXT_OFFSET_HEADER, str(next_offset).encode()), (SEQ_HEADER, str(seq).encode())]


def parse_record(key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None
                 ) -> DeltaRecord | None:
    """A ``DeltaRecord`` from a consumed message, or None (logged) if it is not one."""
    found = dict(headers or ())
    try:
        if key is None or value is None:
            raise ValueError("no key or no value")
        return DeltaRecord(key.decode(), int(found[NEXT_OFFSET_HEADER]), int(found[SEQ_HEADER]), value)
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        log.warning("ignoring a record of the deltas topic without valid key/headers: %s", exc)
        return None


class DeltaBook:
    """The best (highest-ranked) record per key seen so far."""

    def __init__(self) -> None:
        self.best: dict[str, DeltaRecord] = {}

    def offer(self, record: DeltaRecord) -> bool:
        """Keep ``record`` if it outranks the kept one for its key; return whether it was kept."""
        kept = self.best.get(record.key)
        if kept is not None and record.rank <= kept.rank:
            return False
        self.best[record.key] = record
        return True


def ensure_deltas_topic(bootstrap: str, topic: str, *, max_bytes: int, security: ClientSecurity | None = None,
                        partitions: int = 1, timeout_s: float = 30.0) -> bool:
    """Create the compacted deltas topic if missing; return whether it was created.

    ``max.message.bytes`` is ``max_bytes`` (one whole partition state must fit in one record) and
    segments roll at ``max(max_bytes, 64 MiB)`` so compaction (which never touches the active
    segment) keeps the topic near one record per key. An existing topic is left as it is.
    """
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="eddy-admin",
                                 **(security or PLAINTEXT).kwargs())
    except KafkaError as exc:
        raise BrokerError(f"connecting an admin client at {bootstrap} failed: {exc}") from None
    try:
        if topic in set(admin.list_topics()):
            return False
        configs = {"cleanup.policy": "compact", "max.message.bytes": str(max_bytes),
                   "segment.bytes": str(max(max_bytes, 64 * 1_048_576))}
        spec = {topic: {"num_partitions": partitions, "replication_factor": -1, "configs": configs}}
        result = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000), raise_errors=False)
        code = result["topics"][0]["error_code"]
        if code == TopicAlreadyExistsError.errno:
            return False
        if code != 0:
            raise BrokerError(f"creating the deltas topic {topic!r} at {bootstrap} failed: error {code}: "
                              f"{result['topics'][0].get('error_message') or ''}")
        admin.wait_for_topics([topic], timeout_ms=int(timeout_s * 1000))
        return True
    except KafkaError as exc:
        raise BrokerError(f"creating the deltas topic {topic!r} at {bootstrap} failed: {exc}") from None
    finally:
        admin.close()


def deltas_consumer(bootstrap: str, *, max_bytes: int, security: ClientSecurity | None = None,
                    client_id: str = "eddy-deltas") -> KafkaConsumer:
    """A group-less consumer whose fetch sizes fit one whole partition state."""
    try:
        return KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, client_id=client_id,
                             enable_auto_commit=False, isolation_level="read_committed",
                             max_partition_fetch_bytes=max_bytes, fetch_max_bytes=max_bytes,
                             receive_buffer_bytes=4 * 1_048_576, **(security or PLAINTEXT).kwargs())
    except KafkaError as exc:
        raise BrokerError(f"connecting a deltas consumer at {bootstrap} failed: {exc}") from None


def assign_all(consumer: KafkaConsumer, topic: str, timeout_s: float = 30.0) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to ``consumer``, positioned at the beginning."""
    deadline = time.monotonic() + timeout_s
    parts = consumer.partitions_for_topic(topic)
    while not parts and time.monotonic() < deadline:
        time.sleep(0.1)  # metadata of a just-created topic can lag by a moment
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise BrokerError(f"topic {topic!r} has no partitions (does it exist?)")
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    return tps


def read_latest(bootstrap: str, topic: str, keys: Collection[str], *, max_bytes: int,
                security: ClientSecurity | None = None, timeout_s: float = 120.0) -> dict[str, DeltaRecord]:
    """The best record of each of ``keys`` in the deltas topic, read from the beginning to its end.

    Keys without a record are left out. Raises ``BrokerError`` if the end is not reached within
    ``timeout_s``. Cost: one pass over the topic, which compaction keeps near one record per key.
    """
    consumer = deltas_consumer(bootstrap, max_bytes=max_bytes, security=security, client_id="eddy-restore")
    try:
        tps = assign_all(consumer, topic)
        ends = consumer.end_offsets(tps)
        book = DeltaBook()
        wanted = set(keys)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic!r} to its end took more than {timeout_s:.0f} s")
            for msgs in consumer.poll(timeout_ms=200).values():
                for m in msgs:
                    record = parse_record(m.key, m.value, m.headers)
                    if record is not None and record.key in wanted:
                        book.offer(record)
        return book.best
    except KafkaError as exc:
        raise BrokerError(f"reading the deltas topic {topic!r} failed: {exc}") from None
    finally:
        consumer.close()


def summarize(records: dict[str, Any]) -> str:
    """``key@next_offset`` of each record, for logs."""
    return ", ".join(f"{k}@{r.next_offset}" for k, r in sorted(records.items())) or "none"
