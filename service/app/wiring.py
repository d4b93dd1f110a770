"""Build every part of a role from the validated settings; the only place that reads them.

The roles receive typed parts and plain option records; nothing below ``service.app`` sees the
settings object. Each builder returns the role and the clients it opened, for the daemon to close.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer

from learner.backbone import backbone_dim
from learner.heads import make_head
from memory import ReplayMemory
from memory.compensation import DEFAULT_CAPACITY, ErrorMemory
from service.app.config import BackboneSettings, HeadSettings, KafkaSettings, ServingSettings, Settings
from service.core.batch import Reject
from service.core.restore import restore_state
from service.core.snapshots import SnapshotStore
from service.core.state import LearnerState, new_state
from service.errors import BackboneChanged
from service.kafka.clients import ClientSecurity, DeadLetterWriter, ensure_topics, make_consumer, make_producer
from service.kafka.control import ControlPublisher, control_consumer
from service.kafka.deltas import DeltaRecord, deltas_consumer, ensure_deltas_topic, read_latest
from service.kafka.refetch import KafkaRefetcher
from service.kafka.review import KafkaReviewSink
from service.models.backbone import BackboneOptions, LazyBackbone
from service.models.exporter import Exporter
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot
from service.roles.control import ControlFollower, ControlOptions
from service.roles.learn_loop import LearnLoop, LoopOptions
from service.roles.merger import MergeOptions, Merger
from service.roles.replica import ForgetHook, PartitionedLearnLoop, ScaleOutOptions, replica_id
from service.serving.grpc.common import Limits
from service.serving.grpc.server import ConnectionLimits
from service.serving.review import ReviewOptions, ReviewQueue
from service.serving.unknown import UnknownPolicy

log = logging.getLogger("eddy")

# Crash tests only: SIGKILL a scale-out replica at a named point of a forget ("forget_applied":
# applied, not yet published; "forget_published"). Not a setting: no deployment should carry it.
KILL_AT_ENV = "EDDY_TESTING_KILL_AT"

Predict = Callable[[np.ndarray], tuple[np.ndarray, Sequence[str]]]


@dataclass
class Parts:
    """What every role shares: the backbone, the registry and the slot the served model lives in."""

    settings: Settings
    backbone: LazyBackbone
    registry: ModelRegistry
    slot: ModelSlot
    closers: list[Any] = field(default_factory=list)  # clients opened by the builders, closed in reverse


def head_params(head: HeadSettings, *, kind: str | None = None, expansion_width: int | None = None
                ) -> dict[str, Any]:
    """Constructor arguments of the configured head kind."""
    kind = kind or head.kind
    if kind == "ridge":
        width = head.expansion_width if expansion_width is None else expansion_width
        return {"lam": head.ridge_lambda, "expansion_width": width, "seed": head.seed,
                "temperature": head.temperature}
    if kind == "slda":
        return {"shrinkage": head.slda_shrinkage, "temperature": head.temperature}
    return {"temperature": head.temperature}


def build_memory(s: Settings) -> ReplayMemory | None:
    """The replay memory, or None when its capacity is zero."""
    m = s.memory
    if m.max_items == 0 and m.max_bytes is None:
        return None
    return ReplayMemory(s.backbone.dim, index=m.index, max_items=m.max_items, max_bytes=m.max_bytes,
                        recency_weight=m.recency_weight, seed=s.head.seed, use_gpu=m.use_gpu)


def build_error_memory(s: Settings) -> ErrorMemory | None:
    """The error-compensation memory (``memory.error_compensation``), or None when it is off."""
    return ErrorMemory(DEFAULT_CAPACITY, s.backbone.dim) if s.memory.error_compensation else None


def client_security(k: KafkaSettings) -> ClientSecurity:
    """Kafka client security settings as plain values."""
    return ClientSecurity(
        security_protocol=k.security_protocol, sasl_mechanism=k.sasl_mechanism, sasl_username=k.sasl_username,
        sasl_password=secret(k.sasl_password), ssl_cafile=k.ssl_cafile, ssl_certfile=k.ssl_certfile,
        ssl_keyfile=k.ssl_keyfile,
    )


def group_consumer(k: KafkaSettings, security: ClientSecurity, *, client_id: str) -> KafkaConsumer:
    """A consumer in the configured group, with the configured timeouts and batch size (no subscription)."""
    return make_consumer(k.bootstrap_servers, group_id=k.group_id, topics=None, security=security,
                         session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
                         max_poll_records=k.batch_max_events, auto_offset_reset=k.auto_offset_reset,
                         client_id=client_id, reconnect_backoff_max_ms=k.reconnect_backoff_max_ms,
                         max_partition_fetch_bytes=k.max_partition_fetch_bytes)


def connection_limits(sv: ServingSettings) -> ConnectionLimits:
    """The gRPC connection limits as a plain record."""
    return ConnectionLimits(max_connections=sv.max_connections, idle_seconds=sv.connection_idle_seconds,
                            keepalive_seconds=sv.keepalive_seconds, max_concurrent_streams=sv.max_concurrent_streams)


def request_limits(sv: ServingSettings) -> Limits:
    """The per-request serving limits as a plain record (shared by gRPC and HTTP/REST)."""
    return Limits(max_batch=sv.max_batch, max_text_chars=sv.max_text_chars, max_request_chars=sv.max_request_chars,
                  max_top_k=sv.max_top_k, max_response_bytes=sv.max_message_bytes,
                  embed_slice_chars=sv.embed_slice_chars)


def secret(value: Any) -> str | None:
    """The plain value of a pydantic ``SecretStr`` (or None)."""
    return value.get_secret_value() if value is not None else None


def build_exporter(parts: Parts) -> Exporter:
    """The exporter of the configured head kind, publishing to the registry and swapping the slot."""
    s = parts.settings
    return Exporter(registry=parts.registry, slot=parts.slot, backbone=parts.backbone,
                    backbone_identity=parts.backbone.identity, head_kind=s.head.kind,
                    parity_tolerance=s.export.parity_tolerance, max_accuracy_drop=s.export.max_accuracy_drop)


def backbone_options(b: BackboneSettings) -> BackboneOptions:
    """The backbone section as plain values for ``LazyBackbone``."""
    name = b.name if isinstance(b.name, str) else tuple(b.name)
    try:
        encoders = backbone_dim(b.name, models_dir=Path(b.models_dir))
    except (ValueError, OSError):
        encoders = b.dim  # not installed: the first load says how to install it
    if encoders != b.dim:
        log.warning("backbone.dim=%d but %s gives %d: a features-only stream of width %d; text events will be "
                    "dead-lettered (leave backbone.dim unset to follow the encoders)", b.dim, b.name, encoders, b.dim)
    return BackboneOptions(name=name, dim=b.dim, runtime=b.runtime, precision=b.precision, device=b.device,
                           max_tokens=b.max_tokens, batch_size=b.batch_size, threads=b.threads,
                           cache_dir=Path(b.cache_dir), models_dir=Path(b.models_dir))


def check_snapshot_backbone(parts: Parts) -> None:
    """Refuse (``BackboneChanged``) or set aside a newest snapshot learned with another backbone.

    Statistics of two encoders do not mix (different spaces, often different widths), so resuming
    would silently serve nonsense. ``backbone.on_backbone_change = "fresh"`` moves every snapshot
    to ``<checkpoint.dir>/set-aside-<unix time>/`` and lets the daemon start from nothing.
    """
    s = parts.settings
    store = SnapshotStore(Path(s.checkpoint.dir), keep=s.checkpoint.keep)
    restored = store.latest()
    if restored is None:
        return
    old, new = str(restored.get("backbone_identity", "")), parts.backbone.identity
    if not old or old == new:
        return
    if s.backbone.on_backbone_change == "refuse":
        raise BackboneChanged(f"snapshot in {s.checkpoint.dir} was learned with backbone {old}, this process "
                              f"runs {new}: refusing to mix them (run the old backbone, or set "
                              f"EDDY_BACKBONE__ON_BACKBONE_CHANGE=fresh to set the snapshots aside and relearn)")
    aside = store.set_aside()
    log.warning("snapshot learned with backbone %s set aside in %s; learning from nothing with %s", old, aside, new)


def restored_state(parts: Parts) -> tuple[LearnerState, SnapshotStore]:
    """A fresh learner state, restored from the newest snapshot when there is one; and its store.

    Raises ``BackboneChanged`` when that snapshot was learned with another backbone (see
    ``check_snapshot_backbone``).
    """
    s, k = parts.settings, parts.settings.kafka
    identity = parts.backbone.identity
    check_snapshot_backbone(parts)
    state = new_state(s.head.kind, head_params(s.head), build_memory(s), window=k.dedupe_window,
                      backbone_identity=identity, errors=build_error_memory(s))
    store = SnapshotStore(Path(s.checkpoint.dir), keep=s.checkpoint.keep)
    restored = store.latest()
    if restored is not None:
        restore_state(state, restored, s.head.kind, head_params(s.head))  # rebuilds a head whose settings changed
        parts.registry.observe(state.model_version)  # a lost manifest must not send versions backwards
        log.info("restored snapshot: %d events learned, offsets %s", state.counters.learned, state.offsets)
    return state, store


def unknown_policy(s: Settings) -> UnknownPolicy:
    """``serving.unknown`` as plain values."""
    return UnknownPolicy(enabled=s.serving.unknown.enabled, label=s.serving.unknown.label)


def reject_rate(s: Settings) -> float | None:
    """The unknown threshold's promised in-scope rejection rate, or None when rejection is off."""
    return s.serving.unknown.reject_rate if s.serving.unknown.enabled else None


def build_review_queue(parts: Parts) -> ReviewQueue | None:
    """The review queue publishing to ``serving.review.topic`` (default ``<topic>.review``), or None when off."""
    s, k = parts.settings, parts.settings.kafka
    r = s.serving.review
    if not r.enabled:
        return None
    security = client_security(k)
    topic = r.topic or f"{k.topic}.review"
    ensure_topics(k.bootstrap_servers, {topic: 1}, security=security)
    # Not idempotent, acks=1, short max_block: review records are advisory, never worth stalling for.
    producer = make_producer(k.bootstrap_servers, security=security, acks=1, enable_idempotence=False,
                             max_block_ms=1_000, client_id="eddy-review")
    queue = ReviewQueue(KafkaReviewSink(producer, topic), ReviewOptions(
        max_per_second=r.max_per_second, margin=r.margin, dedupe_window=r.dedupe_window, queue_size=r.queue_size))
    parts.closers.extend([producer, queue])  # closed in reverse: the queue drains before the producer closes
    log.info("review queue: rejected and low-margin predictions go to %s (at most %.1f/s)", topic, r.max_per_second)
    return queue


def build_learn_loop(parts: Parts, *, predict: Predict, reject: Reject | None = None) -> LearnLoop:
    """The single-process learn loop with its consumer, dead-letter writer, state and exporter."""
    s, k = parts.settings, parts.settings.kafka
    security = client_security(k)
    ensure_topics(k.bootstrap_servers, {k.topic: 1, k.control_topic: 1}, security=security)
    ensure_topics(k.bootstrap_servers, {f"{k.topic}.dlq": 1}, security=security, compacted={f"{k.topic}.dlq"})
    state, store = restored_state(parts)
    consumer = group_consumer(k, security, client_id="eddy-learner")
    producer = make_producer(k.bootstrap_servers, security=security)
    refetch = KafkaRefetcher(k.bootstrap_servers, k.topic, security)
    parts.closers.extend([consumer, producer, refetch])
    options = LoopOptions(
        topic=k.topic, control_topic=k.control_topic, dim=s.backbone.dim, max_event_bytes=k.max_event_bytes,
        batch_max_events=k.batch_max_events, poll_timeout_ms=k.poll_timeout_ms,
        export_every_events=s.export.every_events, export_every_seconds=s.export.every_seconds,
        snapshot_every_events=s.checkpoint.every_events, snapshot_every_seconds=s.checkpoint.every_seconds,
        log_every_seconds=s.metrics.log_every_seconds, holdout_size=s.export.holdout_size,
        gcv_every_seconds=s.head.gcv_every_seconds, head_label=s.head.kind,
        retry_backoff_max_s=k.reconnect_backoff_max_ms / 1000, max_classes=s.head.max_classes,
        unknown_label=s.serving.unknown.label, reject_rate=reject_rate(s),
    )
    loop = LearnLoop(consumer=consumer, dlq=DeadLetterWriter(producer, f"{k.topic}.dlq"), state=state,
                     store=store, exporter=build_exporter(parts), embed=parts.backbone.embed, refetch=refetch,
                     options=options, predict=predict, reject=reject)
    current = parts.registry.current()
    if current is not None and "rolled_back_from" in parts.registry.meta(current):
        # A rollback outlives restarts: automatic exports stay paused until an explicit export.
        loop.exports.paused = True
        log.warning("model v%d is a rollback: automatic exports stay paused until Admin/Export", current)
    return loop


def build_replica(parts: Parts) -> PartitionedLearnLoop:
    """A scale-out learner replica with its consumer, producer, dead-letter writer and state factory."""
    s, k = parts.settings, parts.settings.kafka
    security = client_security(k)
    ensure_topics(k.bootstrap_servers, {k.topic: 1, k.control_topic: 1}, security=security)
    ensure_topics(k.bootstrap_servers, {f"{k.topic}.dlq": 1}, security=security, compacted={f"{k.topic}.dlq"})
    ensure_deltas_topic(k.bootstrap_servers, k.deltas_topic, max_bytes=k.deltas_max_bytes, security=security)
    rid = replica_id()
    consumer = group_consumer(k, security, client_id=f"eddy-learner-{rid}")
    producer = make_producer(k.bootstrap_servers, security=security, max_request_size=k.deltas_max_bytes)
    controls = control_consumer(k.bootstrap_servers, security=security, client_id=f"eddy-control-{rid}")
    refetch = KafkaRefetcher(k.bootstrap_servers, k.topic, security)
    parts.closers.extend([consumer, producer, controls, refetch])
    dlq = DeadLetterWriter(producer, f"{k.topic}.dlq")
    params = head_params(s.head)
    identity = parts.backbone.identity

    def fresh() -> LearnerState:
        return new_state(s.head.kind, params, None, window=k.dedupe_window, backbone_identity=identity)

    def restore(keys: Collection[str]) -> dict[str, DeltaRecord]:
        return read_latest(k.bootstrap_servers, k.deltas_topic, keys, max_bytes=k.deltas_max_bytes,
                           security=security)

    if s.memory.max_items or s.memory.max_bytes:
        log.info("scale-out mode keeps no replay memory (memory.max_items is ignored)")
    options = ScaleOutOptions(
        topic=k.topic, deltas_topic=k.deltas_topic, dim=s.backbone.dim, max_event_bytes=k.max_event_bytes,
        batch_max_events=k.batch_max_events, poll_timeout_ms=k.poll_timeout_ms,
        publish_every_events=s.checkpoint.every_events, publish_every_seconds=s.checkpoint.every_seconds,
        log_every_seconds=s.metrics.log_every_seconds, recent_rows=min(s.export.holdout_size, 128), replica_id=rid,
        max_classes=s.head.max_classes, unknown_label=s.serving.unknown.label,
    )
    control = ControlFollower(controls, dlq=dlq, refetch=refetch, embed=parts.backbone.embed,
                              options=ControlOptions(k.control_topic, s.backbone.dim, k.max_event_bytes))
    return PartitionedLearnLoop(consumer=consumer, producer=producer, dlq=dlq, restore=restore, new_state=fresh,
                                embed=parts.backbone.embed, options=options, control=control,
                                forget_hook=fault_hook())


def fault_hook() -> ForgetHook | None:
    """The crash-test hook named by ``EDDY_TESTING_KILL_AT`` (None when unset)."""
    point = os.environ.get(KILL_AT_ENV, "")
    if not point:
        return None
    log.warning("%s=%s: this replica SIGKILLs itself at that point (crash tests only)", KILL_AT_ENV, point)

    def kill_at(reached: str) -> None:
        if reached == point:
            log.warning("reached %s: SIGKILL", reached)
            os.kill(os.getpid(), signal.SIGKILL)

    return kill_at


def build_forget_publisher(parts: Parts) -> ControlPublisher:
    """Publishes ``Admin/Forget`` requests to the control topic (serving replicas in scale-out mode)."""
    k = parts.settings.kafka
    publisher = ControlPublisher(k.bootstrap_servers, k.control_topic, security=client_security(k))
    parts.closers.append(publisher)
    return publisher


def build_merger(parts: Parts) -> Merger:
    """The merger with its deltas consumer, exporter and snapshot store."""
    s, k = parts.settings, parts.settings.kafka
    security = client_security(k)
    ensure_deltas_topic(k.bootstrap_servers, k.deltas_topic, max_bytes=k.deltas_max_bytes, security=security)
    consumer = deltas_consumer(k.bootstrap_servers, max_bytes=k.deltas_max_bytes, security=security,
                               client_id="eddy-merger")
    parts.closers.append(consumer)
    options = MergeOptions(
        source_topic=k.topic, deltas_topic=k.deltas_topic, head_kind=s.head.kind,
        head_hyperparameters=make_head(s.head.kind, **head_params(s.head)).hyperparameters(),
        backbone_identity=parts.backbone.identity, export_every_seconds=s.export.every_seconds,
        snapshot_every_seconds=s.checkpoint.every_seconds, holdout_size=s.export.holdout_size,
        poll_timeout_ms=k.poll_timeout_ms, log_every_seconds=s.metrics.log_every_seconds,
        control_topic=k.control_topic, reject_rate=reject_rate(s),
    )
    store = SnapshotStore(Path(s.checkpoint.dir), keep=s.checkpoint.keep)
    return Merger(consumer=consumer, exporter=build_exporter(parts), store=store, options=options)
