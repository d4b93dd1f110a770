"""Kafka clients for eddy: consumer/producer setup, topic creation, offsets, the dead-letter writer.

Every function takes plain arguments (never the settings object). kafka-python's errors are
translated into ``BrokerError`` here, where they escape; records in flight fail through their
futures and are reported by ``DeadLetterWriter.flush``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata

from service.errors import BrokerError

DLQ_SUFFIX = ".dlq"
# Headers the dead-letter writer sets; originals with these names are replaced, not duplicated.
DLQ_HEADERS = ("eddy.reason", "eddy.detail", "eddy.source.topic", "eddy.source.partition",
               "eddy.source.offset", "eddy.failed_at", "eddy.truncated")
MAX_DETAIL_CHARS = 2000
T = TypeVar("T")


def dlq_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``: ``<topic>.dlq``."""
    return topic + DLQ_SUFFIX


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """How clients authenticate to the brokers (PLAINTEXT needs none of the optional fields)."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: Path | str | None = None
    ssl_certfile: Path | str | None = None
    ssl_keyfile: Path | str | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's clients (unset fields are left out)."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        optional = {"sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.sasl_username,
                    "sasl_plain_password": self.sasl_password, "ssl_cafile": self.ssl_cafile,
                    "ssl_certfile": self.ssl_certfile, "ssl_keyfile": self.ssl_keyfile}
        for key, value in optional.items():
            if value is not None:
                out[key] = str(value) if isinstance(value, Path) else value
        return out


PLAINTEXT = ClientSecurity()


def _broker_error(what: str, bootstrap: str, exc: Exception) -> BrokerError:
    return BrokerError(f"{what} at {bootstrap} failed: {type(exc).__name__}: {exc}")


def make_consumer(bootstrap: str, *, group_id: str | None, topics: list[str] | None = None,
                  security: ClientSecurity | None = None, session_timeout_ms: int = 10_000,
                  heartbeat_interval_ms: int = 1_000, max_poll_records: int = 500,
                  auto_offset_reset: str = "earliest", client_id: str = "eddy",
                  reconnect_backoff_max_ms: int = 5_000, **extra: Any) -> KafkaConsumer:
    """A consumer that never commits on its own, yields raw ``bytes`` values, reads committed data.

    ``topics`` are subscribed through ``subscribe`` (below); ``topics=None`` subscribes to nothing
    (the caller then calls ``subscribe`` with its own rebalance listener, or assigns partitions).
    ``extra`` goes to ``KafkaConsumer`` unchanged. Raises ``BrokerError`` when no broker answers
    within kafka-python's bootstrap timeout (``bootstrap_timeout_ms``, 30 s by default).
    """
    sec = security or PLAINTEXT
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, client_id=client_id,
            enable_auto_commit=False, isolation_level="read_committed",
            auto_offset_reset=auto_offset_reset, max_poll_records=max_poll_records,
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=heartbeat_interval_ms,
            reconnect_backoff_max_ms=reconnect_backoff_max_ms, **sec.kwargs(), **extra,
        )
    except KafkaError as exc:
        raise _broker_error("connecting a consumer", bootstrap, exc) from None
    if topics:
        subscribe(consumer, topics)
    return consumer


def subscribe(consumer: KafkaConsumer, topics: list[str], listener: Any = None) -> None:
    """Subscribe ``consumer`` to ``topics`` once their partitions are in its metadata.

    Works around a race in kafka-python 3.0.12: when a consumer joins its group before it knows a
    subscribed topic's partitions, it is assigned nothing, rejoins when the metadata arrives, and
    a ``poll`` whose timeout expires while that second join completes can drop the new
    assignment for good (the member stays in the group with no partitions and reads nothing).
    Loading the metadata first makes the first join assign every partition. Use this instead of
    ``consumer.subscribe``.
    """
    for topic in topics:
        try:
            consumer.partitions_for_topic(topic)
        except KafkaError as exc:
            raise BrokerError(f"reading the partitions of {topic!r} failed: {type(exc).__name__}: {exc}") \
                from None
    consumer.subscribe(topics, listener=listener)


def make_producer(bootstrap: str, *, security: ClientSecurity | None = None, acks: str | int = "all",
                  linger_ms: int = 5, enable_idempotence: bool = True, transactional_id: str | None = None,
                  client_id: str = "eddy", max_block_ms: int = 30_000, **extra: Any) -> KafkaProducer:
    """A producer for raw ``bytes`` keys and values; idempotent by default.

    kafka-python 3 implements the idempotent producer (KIP-98, on by default since KIP-679): retries
    after a lost acknowledgement do not duplicate records within one producer session. Idempotence
    needs ``acks='all'``; asking for both idempotence and another ``acks`` raises. A
    ``transactional_id`` makes it transactional (the caller runs ``init_transactions()`` once).
    ``max_block_ms`` bounds how long ``send`` blocks when metadata or buffer space is missing.
    Raises ``BrokerError`` when no broker answers within the bootstrap timeout (30 s).
    """
    sec = security or PLAINTEXT
    try:
        return KafkaProducer(bootstrap_servers=bootstrap, acks=acks, linger_ms=linger_ms,
                             enable_idempotence=enable_idempotence, transactional_id=transactional_id,
                             client_id=client_id, max_block_ms=max_block_ms, **sec.kwargs(), **extra)
    except KafkaError as exc:
        raise _broker_error("connecting a producer", bootstrap, exc) from None


def _admin(bootstrap: str, security: ClientSecurity | None) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="eddy-admin",
                                **(security or PLAINTEXT).kwargs())
    except KafkaError as exc:
        raise _broker_error("connecting an admin client", bootstrap, exc) from None


def ensure_topics(bootstrap: str, topics: Mapping[str, int], security: ClientSecurity | None = None, *,
                  compacted: Collection[str] = frozenset(), timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    ``topics`` maps name -> partition count; the replication factor is the cluster's default.
    Topics in ``compacted`` get ``cleanup.policy=compact``. Existing topics are left as they are
    (their partitions and configs are not changed); a topic created concurrently by someone else
    counts as existing. Returns once every created topic has a leader for every partition.
    """
    admin = _admin(bootstrap, security)
    try:
        missing = [name for name in topics if name not in set(admin.list_topics())]
        if not missing:
            return []
        spec = {name: {"num_partitions": topics[name], "replication_factor": -1,
                       "configs": {"cleanup.policy": "compact"} if name in compacted else {}}
                for name in missing}
        result = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000), raise_errors=False)
        created = []
        for topic in result["topics"]:
            code = topic["error_code"]
            if code == 0:
                created.append(topic["name"])
            elif code != TopicAlreadyExistsError.errno:
                raise BrokerError(f"creating topic {topic['name']!r} at {bootstrap} failed: error {code}: "
                                  f"{topic.get('error_message') or ''}".rstrip(": "))
        if created:
            admin.wait_for_topics(created, timeout_ms=int(timeout_s * 1000))
        return created
    except KafkaError as exc:
        raise _broker_error("creating topics", bootstrap, exc) from None
    finally:
        admin.close()


def end_offsets(bootstrap: str, topic: str, security: ClientSecurity | None = None) -> dict[int, int]:
    """Partition -> offset of the next record to be written (the high watermark) of ``topic``.

    An unknown topic gives ``{}``.
    """
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, client_id="eddy-offsets",
                                 enable_auto_commit=False, **(security or PLAINTEXT).kwargs())
    except KafkaError as exc:
        raise _broker_error("connecting a consumer", bootstrap, exc) from None
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        return {tp.partition: int(off) for tp, off in consumer.end_offsets(tps).items()} if tps else {}
    except KafkaError as exc:
        raise _broker_error(f"reading end offsets of {topic!r}", bootstrap, exc) from None
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group_id: str, topic: str, security: ClientSecurity | None = None,
                      *, timeout_s: float = 30.0) -> dict[int, int]:
    """Partition -> committed offset (next record to read) of ``group_id`` on ``topic``.

    Partitions without a commit are left out; an unknown group gives ``{}``. Retriable errors
    (the group coordinator still loading, as on a fresh broker) are retried for ``timeout_s``.
    """
    admin = _admin(bootstrap, security)
    try:
        groups = _retrying(lambda: admin.list_group_offsets(group_id), timeout_s)
    except KafkaError as exc:
        raise _broker_error(f"reading committed offsets of group {group_id!r}", bootstrap, exc) from None
    finally:
        admin.close()
    offsets = groups.get(group_id, {})
    return {tp.partition: int(om.offset) for tp, om in offsets.items()
            if tp.topic == topic and om.offset >= 0}


def _retrying(call: Callable[[], T], timeout_s: float) -> T:
    """``call()``, repeated while it raises a retriable kafka-python error and time is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # backoff between attempts


class DeadLetterWriter:
    """Writes events eddy could not learn from to a dead-letter topic, byte for byte.

    Each dead letter's value is the original message value (``None`` stays a tombstone), its
    headers are the original headers plus ``eddy.reason`` (a code from ``service.core.events.REASONS``
    or another bounded code), ``eddy.detail`` (human-readable, at most 2000 characters),
    ``eddy.source.topic``, ``eddy.source.partition``, ``eddy.source.offset`` (decimal ASCII) and
    ``eddy.failed_at`` (UTC, ISO 8601 with milliseconds).

    Idempotency: the key is ``"<topic>:<partition>:<offset>"`` of the source record, so when a crash
    makes eddy re-process a record and re-send its dead letter, both copies carry the same key: a
    reader can drop repeats by key, and on a compacted dead-letter topic Kafka keeps only the last.
    (The idempotent producer itself only removes duplicates caused by its own retries.)

    A value longer than ``max_value_bytes`` (it would exceed the broker's message size limit) is
    cut to that length and marked with ``eddy.truncated`` = the original length, so an oversized
    event is still recorded rather than failing the writer.
    """

    def __init__(self, producer: KafkaProducer, dlq_topic: str, *, max_value_bytes: int = 900_000) -> None:
        self.producer = producer
        self.topic = dlq_topic
        self.max_value_bytes = max_value_bytes
        self._pending: list[FutureRecordMetadata] = []

    def send(self, raw: bytes | None, *, reason: str, detail: str, topic: str, partition: int, offset: int,
             headers: Iterable[tuple[str, bytes | None]] = ()) -> FutureRecordMetadata:
        """Queue one dead letter; return its future. ``BrokerError`` if it cannot even be queued."""
        ours = {
            "eddy.reason": reason.encode(),
            "eddy.detail": detail[:MAX_DETAIL_CHARS].encode("utf-8", "replace"),
            "eddy.source.topic": topic.encode(),
            "eddy.source.partition": str(partition).encode(),
            "eddy.source.offset": str(offset).encode(),
            "eddy.failed_at": _utc_now().encode(),
        }
        value = raw
        if raw is not None and len(raw) > self.max_value_bytes:
            value = raw[: self.max_value_bytes]
            ours["eddy.truncated"] = str(len(raw)).encode()
        kept = [(k, v) for k, v in headers if k not in DLQ_HEADERS]
        try:
            future = self.producer.send(self.topic, value=value, key=f"{topic}:{partition}:{offset}".encode(),
                                        headers=kept + list(ours.items()))
        except KafkaError as exc:
            raise BrokerError(f"queueing a dead letter for {topic}:{partition}:{offset} to {self.topic} "
                              f"failed: {type(exc).__name__}: {exc}") from None
        self._pending.append(future)
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued dead letter is acknowledged.

        Raises ``BrokerError`` naming how many failed (and the first error) when any was not
        written; the caller must then not commit the source offsets, so that they are processed and
        dead-lettered again after a restart. The writer stays failed: every later ``flush`` raises
        again, so offsets can never move past a dead letter that was not written.
        """
        pending, self._pending = self._pending, []
        try:
            self.producer.flush(timeout=timeout)
        except KafkaError as exc:
            raise BrokerError(f"flushing dead letters to {self.topic} failed: "
                              f"{type(exc).__name__}: {exc}") from None
        failed = [f for f in pending if not f.is_done or f.failed()]
        self._pending = failed + self._pending  # stays failed: those records were never re-sent
        if failed:
            first = failed[0].exception if failed[0].is_done else "not acknowledged before the timeout"
            raise BrokerError(f"{len(failed)} of {len(pending)} dead letters were not written to "
                              f"{self.topic}: {first}")

    @property
    def pending(self) -> int:
        """Dead letters queued since the last ``flush``."""
        return len(self._pending)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def broker_reachable(client: KafkaConsumer) -> bool:
    """Whether the client holds a live connection to any broker.

    kafka-python 3 exposes no public answer (``bootstrap_connected`` is true only while it
    bootstraps), so this reads its connection manager; any surprise there reads as "not reachable".
    """
    try:
        return bool(client._manager.least_used_connections())
    except Exception:
        return False


class RebalanceCallbacks(ConsumerRebalanceListener):
    """A rebalance listener that calls two functions with the partitions, as lists.

    kafka-python 3 calls them on its IO thread, where blocking work stalls heartbeats: keep them
    short (set a flag, seek) and do the heavy part on the thread that polls.
    """

    def __init__(self, on_revoked: Callable[[list[TopicPartition]], None],
                 on_assigned: Callable[[list[TopicPartition]], None]) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Called before ``revoked`` leave this consumer."""
        self._on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """Called once ``assigned`` belong to this consumer."""
        self._on_assigned(list(assigned))
