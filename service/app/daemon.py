"""``eddy serve``: wire the parts together and run them until a signal says stop.

Roles: ``learn`` consumes and learns (and exports to the registry), ``merge`` sums scale-out
replicas' statistics into models, ``serve`` answers gRPC and HTTP/REST from the
registry's newest model, ``all`` (default) does both in one process, swapping models in place.
Lifecycle: startup (restore snapshot, load the served model, open sockets) -> main loop ->
shutdown (final snapshot, graceful gRPC and HTTP stop). A second SIGINT/SIGTERM forces exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

import grpc
import numpy as np
from aiohttp import web

from service import metrics
from service.app import wiring
from service.app.config import Settings
from service.models.backbone import LazyBackbone
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot, RegistryFollower, load_registered
from service.roles.learn_loop import LearnLoop
from service.serving.admin import DaemonAdmin, ForgetPublisher
from service.serving.grpc.common import Predictor
from service.serving.grpc.oip_v2 import OipServicer
from service.serving.grpc.server import start_server, stop_server
from service.serving.ops_http import HealthReport, assess, start_http_server
from service.serving.rest.app import start_rest, stop_rest
from service.serving.unknown import Rejection

log = logging.getLogger("eddy")
GIL_SWITCH_INTERVAL_S = 0.0005  # see run_daemon


class Learner(Protocol):
    """What the daemon needs of a learn role (``LearnLoop``, ``PartitionedLearnLoop``, ``Merger``)."""

    def run(self, stop: threading.Event) -> None:
        """Learn until ``stop`` is set, then leave a durable state behind."""


def run_daemon(settings: Settings, *, role: str = "all") -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    stop = threading.Event()
    _install_signals(stop)
    # The learner's head update runs on a worker thread that needs the GIL back between its BLAS
    # calls; with CPython's default 5 ms hand-over it waited on the decoding thread so long that
    # the overlap was lost (bench/learner_profile.py --switch-interval-ms, issue 19).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    if settings.head.blas_threads:
        from service.app.threads import limit_native_threads

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
        self.s = settings
        self.role = role
        self.backbone = LazyBackbone(wiring.backbone_options(settings.backbone))
        self.registry = ModelRegistry(Path(settings.export.registry_dir), keep=settings.export.keep)
        self.slot = ModelSlot(settings.serving.versions_loaded)
        self.parts = wiring.Parts(settings, self.backbone, self.registry, self.slot)
        self.loop: Learner | None = None
        self.crashed = False
        metrics.BUILD_INFO.info({"version": _version(), "role": role, "head": settings.head.kind,
                                 "backbone": self.backbone.identity})

    # -- startup -------------------------------------------------------------------------------
    async def run(self, stop: threading.Event) -> None:
        """Start every part of this role, wait for ``stop``, shut down in order.

        Raises ``BackboneChanged`` before opening anything when the newest snapshot was learned with
        another backbone (and ``backbone.on_backbone_change`` is ``refuse``).
        """
        if self.role in ("all", "learn") and not self.s.kafka.scale_out:
            wiring.check_snapshot_backbone(self.parts)
        if self.role != "merge":  # the merger never embeds
            self.backbone.warm_in_background()
        self._load_current_model()
        m = self.s.metrics
        http, port = start_http_server(m.host, m.port, health=self.health, max_connections=m.max_connections,
                                       idle_seconds=m.idle_seconds)
        self.parts.closers.append(http)
        log.info("metrics on http://%s:%d/metrics", self.s.metrics.host, port)
        server = rest = None
        if self.role in ("all", "serve"):
            sv = self.s.serving
            # One of each for both surfaces: texts coalesce, and reviews rate-limit, across them.
            predictor = Predictor(self.slot, wiring.request_limits(sv), coalesce_texts=sv.coalesce_texts)
            rejection = Rejection(wiring.unknown_policy(self.s), wiring.build_review_queue(self.parts))
            server = await self._start_grpc(predictor, rejection)
            rest = await self._start_rest(predictor, rejection)
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
        if server is not None and rest is not None:
            await asyncio.gather(stop_rest(rest), stop_server(server, 2.0))

    def _load_current_model(self) -> None:
        """Serve the registry's newest loadable model, with the kept versions before it that requests may pin.

        If the current version cannot be loaded, the newest older one that can serves instead.
        """
        try:
            current = self.registry.current()
            if current is None:
                return
            kept = sorted((int(e["version"]) for e in self.registry.versions() if int(e["version"]) <= current),
                          reverse=True) or [current]
        except Exception as exc:
            log.warning("could not read the model registry: %s", exc)
            return
        loaded = []
        for version in kept:
            try:
                loaded.append(load_registered(self.registry, version, self.backbone))
            except Exception as exc:
                log.warning("could not load model v%d from the registry: %s", version, exc)
            if len(loaded) == self.slot.versions_loaded:
                break
        for model in reversed(loaded):  # oldest first: the newest ends up current
            self.slot.swap(model)
        if loaded:
            log.info("serving model v%s from the registry (loaded: %s)", self.slot.version, self.slot.loaded_versions())

    async def _start_rest(self, predictor: Predictor, rejection: Rejection) -> web.AppRunner:
        sv = self.s.serving
        runner, port = await start_rest(
            OipServicer(predictor, sv.model_name, rejection), host=sv.host, port=sv.http_port,
            max_body_bytes=sv.max_message_bytes, predict_token=wiring.secret(sv.predict_token),
            admin_token=wiring.secret(sv.admin_token), tls_cert=sv.tls_cert, tls_key=sv.tls_key)
        log.info("HTTP/REST on %s://%s:%d/v2 (Open Inference Protocol v2)", "https" if sv.tls_cert else "http",
                 sv.host, port)
        return runner

    async def _start_grpc(self, predictor: Predictor, rejection: Rejection) -> grpc.aio.Server:
        sv = self.s.serving
        server, port = await start_server(
            self.slot, host=sv.host, port=sv.grpc_port, model_name=sv.model_name,
            max_message_bytes=sv.max_message_bytes, max_batch=sv.max_batch, max_text_chars=sv.max_text_chars,
            admin=DaemonAdmin(self.registry, self.slot, self.backbone, learner=self._admin_learner,
                              forget_publisher=self._forget_publisher()),
            admin_token=wiring.secret(sv.admin_token), predict_token=wiring.secret(sv.predict_token),
            tls_cert=sv.tls_cert, tls_key=sv.tls_key, coalesce_texts=sv.coalesce_texts, predictor=predictor,
            connections=wiring.connection_limits(sv), rejection=rejection,
        )
        log.info("gRPC on %s:%d (eddy.v1, inference.GRPCInferenceService, health, reflection)", sv.host, port)
        return server

    def _start_follower(self, stop: threading.Event) -> threading.Thread:
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
        assert self.loop is not None
        try:
            self.loop.run(stop)
        except Exception:
            log.exception("learner crashed; stopping the daemon")
            self.crashed = True
            stop.set()

    def build_learner(self) -> Learner:
        """The learn role of this process (docs/scaling.md for ``learn`` with scale-out and ``merge``)."""
        if self.role == "merge":
            return wiring.build_merger(self.parts)
        if self.role == "learn" and self.s.kafka.scale_out:
            return wiring.build_replica(self.parts)
        return wiring.build_learn_loop(self.parts, predict=self.predict_served, reject=self.reject_served)

    def _forget_publisher(self) -> ForgetPublisher | None:
        """Scale-out serving replicas queue Admin/Forget on the control topic for the learner replicas."""
        if self.role == "serve" and self.s.kafka.scale_out:
            return wiring.build_forget_publisher(self.parts)
        return None

    def _admin_learner(self) -> LearnLoop | None:
        return self.loop if isinstance(self.loop, LearnLoop) else None

    def predict_served(self, X: np.ndarray) -> tuple[np.ndarray, Sequence[str]]:
        """The served model's probabilities (prequential accuracy is what users would have seen)."""
        model = self.slot.get()
        if model is None:
            return np.zeros((len(X), 0), np.float32), []
        return model.predict_features(X), model.classes

    def reject_served(self, X: np.ndarray) -> tuple[np.ndarray, Sequence[str]] | None:
        """Which rows the served model answers unknown, and its classes (None before the first model)."""
        model = self.slot.get()
        if model is None:
            return None
        return model.rejects(model.predict_scored(X)[1]), model.classes

    # -- health --------------------------------------------------------------------------------
    def health(self) -> HealthReport:
        """Liveness and readiness for /healthz and /readyz (rule: ``service.serving.ops_http.assess``)."""
        model = self.slot.get()
        learner_alive = self.loop is None or self._learner_thread_alive()
        return assess(
            loop_alive=learner_alive, model_served=model is not None,
            broker_up=metrics.broker_is_up(),
            serves=self.role in ("all", "serve"), learns=self.role in ("all", "learn"),
            details={"role": self.role, "model_version": model.version if model else None},
            faults=metrics.faults(),
        )

    def _learner_thread_alive(self) -> bool:
        return any(t.name == "learner" and t.is_alive() for t in threading.enumerate())

    def close(self) -> None:
        """Close sockets and clients (best effort, in reverse order of opening)."""
        for thing in reversed(self.parts.closers):
            try:
                (getattr(thing, "close", None) or thing.stop)()
            except Exception as exc:
                log.debug("close %r: %s", thing, exc)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eddy")
    except PackageNotFoundError:
        return "dev"
