"""``eddy serve``: wire the parts together and run them until a signal says stop.

Roles: ``learn`` consumes and learns (and exports to the registry), ``merge`` sums scale-out
replicas' statistics into models, ``serve`` answers gRPC from the
registry's newest model, ``all`` (default) does both in one process, swapping models in place.
Lifecycle: startup (restore snapshot, load the served model, open sockets) -> main loop ->
shutdown (final snapshot, graceful gRPC stop). A second SIGINT/SIGTERM forces exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np

from service import metrics
from service.config import HeadSettings, KafkaSettings, Settings
from service.lazy import LazyBackbone

if TYPE_CHECKING:
    import grpc
    from kafka import KafkaConsumer

    from memory import ErrorMemory, ReplayMemory
    from service.http import HealthReport
    from service.kafka import ClientSecurity

log = logging.getLogger("eddy")


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


def run_daemon(settings: Settings, *, role: str = "all") -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    stop = threading.Event()
    _install_signals(stop)
    if settings.head.blas_threads:
        from service.threads import limit_native_threads

        pools = limit_native_threads(settings.head.blas_threads)
        log.debug("native thread pools: %s", pools)
    daemon = Daemon(settings, role=role)
    try:
        asyncio.run(daemon.run(stop))
    finally:
        daemon.close()
    return 1 if daemon.crashed else 0


def _install_signals(stop: threading.Event) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("second signal: forcing exit")
            os._exit(1)
        log.info("signal %d: shutting down gracefully (again to force)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


class Daemon:
    """All long-lived parts of one eddy process."""

    def __init__(self, settings: Settings, *, role: str) -> None:
        from service.registry import ModelRegistry
        from service.served_model import ModelSlot

        self.s = settings
        self.role = role
        self.backbone = LazyBackbone(settings.backbone)
        self.registry = ModelRegistry(Path(settings.export.registry_dir), keep=settings.export.keep)
        self.slot = ModelSlot()
        self.loop: Any = None  # LearnLoop, PartitionedLearnLoop or Merger: each has run(stop) and alive
        self.crashed = False
        self._closers: list[Any] = []
        metrics.BUILD_INFO.info({"version": _version(), "role": role, "head": settings.head.kind,
                                 "backbone": settings.backbone.name})

    # -- startup -------------------------------------------------------------------------------
    async def run(self, stop: threading.Event) -> None:
        """Start every part of this role, wait for ``stop``, shut down in order."""
        from service.http import start_http_server

        if self.role != "merge":  # the merger never embeds
            self.backbone.warm_in_background()
        self._load_current_model()
        http, port = start_http_server(self.s.metrics.host, self.s.metrics.port, health=self.health)
        self._closers.append(http)
        log.info("metrics on http://%s:%d/metrics", self.s.metrics.host, port)
        server = None
        if self.role in ("all", "serve"):
            server = await self._start_grpc()
        threads = []
        if self.role in ("all", "learn", "merge"):
            threads.append(self._start_learner(stop))
        if self.role == "serve":
            threads.append(self._start_follower(stop))
        while not stop.is_set() and all(t.is_alive() for t in threads):
            await asyncio.sleep(0.2)
        stop.set()
        self.backbone.close()  # an export still running would hold the learner for minutes
        for t in threads:
            await asyncio.get_running_loop().run_in_executor(None, t.join, 60)
        if server is not None:
            from service.grpc.server import stop_server

            await stop_server(server, 2.0)

    def _load_current_model(self) -> None:
        from service.served_model import load_registered

        version = self.registry.current()
        if version is None:
            return
        try:
            self.slot.swap(load_registered(self.registry, version, self.backbone))
            log.info("serving model v%d from the registry", version)
        except Exception as exc:
            log.warning("could not load model v%d from the registry: %s", version, exc)

    async def _start_grpc(self) -> grpc.aio.Server:
        from service.admin import DaemonAdmin
        from service.grpc.server import start_server

        sv = self.s.serving
        server, port = await start_server(
            self.slot, host=sv.host, port=sv.grpc_port, model_name=sv.model_name,
            max_message_bytes=sv.max_message_bytes, max_batch=sv.max_batch, max_text_chars=sv.max_text_chars,
            admin=DaemonAdmin(self), admin_token=_secret(sv.admin_token), predict_token=_secret(sv.predict_token),
            tls_cert=sv.tls_cert, tls_key=sv.tls_key, coalesce_texts=sv.coalesce_texts,
        )
        log.info("gRPC on %s:%d (eddy.v1, inference.GRPCInferenceService, health, reflection)", sv.host, port)
        return server

    def _start_follower(self, stop: threading.Event) -> threading.Thread:
        from service.served_model import RegistryFollower

        follower = RegistryFollower(self.registry, self.slot, self.backbone, interval=self.s.serving.follow_seconds)
        t = threading.Thread(target=follower.run, args=(stop,), name="follower", daemon=True)
        t.start()
        return t

    def _start_learner(self, stop: threading.Event) -> threading.Thread:
        self.loop = self.build_learner()
        t = threading.Thread(target=self._learn_forever, args=(stop,), name="learner", daemon=True)
        t.start()
        return t

    def _learn_forever(self, stop: threading.Event) -> None:
        try:
            self.loop.run(stop)
        except Exception:
            log.exception("learner crashed; stopping the daemon")
            self.crashed = True
            stop.set()

    def build_learner(self) -> Any:
        """The learn loop with its consumer, dead-letter writer, state and exporter."""
        if self.role == "merge":  # docs/scaling.md
            from service.merger import build_merger

            return build_merger(self)
        if self.role == "learn" and self.s.kafka.scale_out:
            from service.scaleout import build_scale_out_learner

            return build_scale_out_learner(self)
        from service.checkpoint import SnapshotStore
        from service.exporter import Exporter
        from service.kafka import DeadLetterWriter, ensure_topics, make_producer
        from service.loop import LearnLoop, LoopOptions
        from service.rebuild import restore_state
        from service.refetch import KafkaRefetcher
        from service.state import new_state

        s, k = self.s, self.s.kafka
        security = security_from(k)
        ensure_topics(k.bootstrap_servers, {k.topic: 1, k.control_topic: 1}, security=security)
        ensure_topics(k.bootstrap_servers, {f"{k.topic}.dlq": 1}, security=security, compacted={f"{k.topic}.dlq"})
        state = new_state(s.head.kind, head_params(s.head), build_memory(s), window=k.dedupe_window,
                          backbone_identity=self.backbone.identity, errors=build_error_memory(s))
        store = SnapshotStore(Path(s.checkpoint.dir), keep=s.checkpoint.keep)
        restored = store.latest()
        if restored is not None:
            restore_state(state, restored, s.head.kind, head_params(s.head))  # rebuilds a head whose settings changed
            log.info("restored snapshot: %d events learned, offsets %s", state.counters.learned, state.offsets)
            if state.backbone_identity != self.backbone.identity:
                # Text statistics from two encoders do not mix; feature-only streams are unaffected.
                log.warning("snapshot was learned with backbone %s, this process runs %s: text events now "
                            "embed differently from those already learned", state.backbone_identity,
                            self.backbone.identity)
                state.backbone_identity = self.backbone.identity
        consumer = group_consumer(k, security, client_id="eddy-learner")
        producer = make_producer(k.bootstrap_servers, security=security)
        self._closers.extend([consumer, producer])
        exporter = Exporter(registry=self.registry, slot=self.slot, backbone=self.backbone,
                            backbone_identity=self.backbone.identity, head_kind=s.head.kind,
                            parity_tolerance=s.export.parity_tolerance,
                            max_accuracy_drop=s.export.max_accuracy_drop)
        options = LoopOptions(
            topic=k.topic, control_topic=k.control_topic, dim=s.backbone.dim, max_event_bytes=k.max_event_bytes,
            batch_max_events=k.batch_max_events, poll_timeout_ms=k.poll_timeout_ms,
            export_every_events=s.export.every_events, export_every_seconds=s.export.every_seconds,
            snapshot_every_events=s.checkpoint.every_events, snapshot_every_seconds=s.checkpoint.every_seconds,
            log_every_seconds=s.metrics.log_every_seconds, holdout_size=s.export.holdout_size,
            gcv_every_seconds=s.head.gcv_every_seconds, head_label=s.head.kind,
            retry_backoff_max_s=k.reconnect_backoff_max_ms / 1000,
        )
        refetch = KafkaRefetcher(k.bootstrap_servers, k.topic, security)
        self._closers.append(refetch)
        loop = LearnLoop(consumer=consumer, dlq=DeadLetterWriter(producer, f"{k.topic}.dlq"), state=state,
                         store=store, exporter=exporter, embed=self.backbone.embed, refetch=refetch,
                         options=options, predict=self.predict_served)
        current = self.registry.current()
        if current is not None and "rolled_back_from" in self.registry.meta(current):
            # A rollback outlives restarts: automatic exports stay paused until an explicit export.
            loop.exports_paused = True
            log.warning("model v%d is a rollback: automatic exports stay paused until Admin/Export", current)
        return loop

    def predict_served(self, X: np.ndarray) -> tuple[np.ndarray, Sequence[str]]:
        """The served model's probabilities (prequential accuracy is what users would have seen)."""
        model = self.slot.get()
        if model is None:
            return np.zeros((len(X), 0), np.float32), []
        return model.predict_features(X), model.classes

    # -- health --------------------------------------------------------------------------------
    def health(self) -> HealthReport:
        """Liveness and readiness for /healthz and /readyz (rule: ``service.http.assess``)."""
        from service.http import assess

        model = self.slot.get()
        learner_alive = self.loop is None or self._learner_thread_alive()
        return assess(
            loop_alive=learner_alive, model_served=model is not None,
            broker_up=metrics.BROKER_UP._value.get() == 1,
            serves=self.role in ("all", "serve"), learns=self.role in ("all", "learn"),
            details={"role": self.role, "model_version": model.version if model else None},
        )

    def _learner_thread_alive(self) -> bool:
        return any(t.name == "learner" and t.is_alive() for t in threading.enumerate())

    def close(self) -> None:
        """Close sockets and clients (best effort, in reverse order of opening)."""
        for thing in reversed(self._closers):
            try:
                (getattr(thing, "close", None) or thing.stop)()
            except Exception as exc:
                log.debug("close %r: %s", thing, exc)


def build_memory(s: Settings) -> ReplayMemory | None:
    """The replay memory, or None when its capacity is zero."""
    from memory import ReplayMemory

    m = s.memory
    if m.max_items == 0 and m.max_bytes is None:
        return None
    return ReplayMemory(s.backbone.dim, index=m.index, max_items=m.max_items, max_bytes=m.max_bytes,
                        recency_weight=m.recency_weight, seed=s.head.seed, use_gpu=m.use_gpu)


def build_error_memory(s: Settings) -> ErrorMemory | None:
    """The error-compensation memory (``memory.error_compensation``), or None when it is off."""
    from memory.compensation import DEFAULT_CAPACITY, ErrorMemory

    return ErrorMemory(DEFAULT_CAPACITY, s.backbone.dim) if s.memory.error_compensation else None


def security_from(k: KafkaSettings) -> ClientSecurity:
    """Kafka client security settings as plain values."""
    from service.kafka import ClientSecurity

    return ClientSecurity(
        security_protocol=k.security_protocol, sasl_mechanism=k.sasl_mechanism, sasl_username=k.sasl_username,
        sasl_password=_secret(k.sasl_password), ssl_cafile=k.ssl_cafile, ssl_certfile=k.ssl_certfile,
        ssl_keyfile=k.ssl_keyfile,
    )


def group_consumer(k: KafkaSettings, security: ClientSecurity, *, client_id: str) -> KafkaConsumer:
    """A consumer in the configured group, with the configured timeouts and batch size (no subscription)."""
    from service.kafka import make_consumer

    return make_consumer(k.bootstrap_servers, group_id=k.group_id, topics=None, security=security,
                         session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
                         max_poll_records=k.batch_max_events, auto_offset_reset=k.auto_offset_reset,
                         client_id=client_id, reconnect_backoff_max_ms=k.reconnect_backoff_max_ms,
                         max_partition_fetch_bytes=k.max_partition_fetch_bytes)


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eddy")
    except PackageNotFoundError:
        return "dev"
