"""Build, start and stop eddy's gRPC server (grpc.aio).

One port serves: ``eddy.v1.Inference``, ``eddy.v1.Admin``, the Open Inference Protocol v2
(``inference.GRPCInferenceService``), ``grpc.health.v1.Health`` (SERVING once a model is served,
NOT_SERVING before and while stopping) and server reflection listing all of them.

Lifecycle: ``server, port = await start_server(slot, ...)`` then ``await stop_server(server, grace)``
(or plain ``await server.stop(grace)``): in-flight calls get ``grace`` seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from service.errors import ConfigError
from service.models.served import ModelSlot, ServedModel
from service.serving.grpc.auth import TokenAuth
from service.serving.grpc.common import Limits, Predictor
from service.serving.grpc.eddy_v1 import AdminHandler, AdminServicer, InferenceServicer
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as eddy_pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as eddy_grpc
from service.serving.grpc.oip_v2 import OipServicer
from service.serving.review import ReviewQueue
from service.serving.unknown import Rejection, UnknownPolicy

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    eddy_pb.DESCRIPTOR.services_by_name["Inference"].full_name,
    eddy_pb.DESCRIPTOR.services_by_name["Admin"].full_name,
    oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)
_HEALTH_NAMES = ("", *SERVICE_NAMES[:3])
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
_STOPPERS: weakref.WeakKeyDictionary[grpc.aio.Server, Callable[[], Awaitable[None]]] = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True)
class ConnectionLimits:
    """How many gRPC connections are held and for how long (``serving`` settings)."""

    max_connections: int = 512
    idle_seconds: float = 120.0
    keepalive_seconds: float = 60.0
    max_concurrent_streams: int = 128


def connection_options(limits: ConnectionLimits) -> list[tuple[str, int]]:
    """Grpc core channel arguments enforcing ``limits``.

    ``grpc.max_allowed_incoming_connections`` refuses connections past the cap (grpc >= 1.56; the
    server closes the extra socket at once); ``max_connection_idle_ms`` closes a connection with no
    call for that long (GOAWAY, clients reconnect on their next call); keepalive pings find dead
    peers; a client that connects and never finishes the HTTP/2 handshake is dropped after 10 s.
    Issue 14: thousands of idle connections were held forever, until the process ran out of file
    descriptors and even ``/healthz`` failed.
    """
    return [("grpc.max_allowed_incoming_connections", limits.max_connections),
            ("grpc.max_connection_idle_ms", int(limits.idle_seconds * 1000)),
            ("grpc.keepalive_time_ms", int(limits.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.server_handshake_timeout_ms", 10_000),
            ("grpc.max_concurrent_streams", limits.max_concurrent_streams)]


def raise_fd_limit(connections: int, reserve: int = 256) -> None:
    """Raise the soft open-files limit so ``connections`` fit with ``reserve`` to spare.

    The reserve is for Kafka, files and the HTTP server; warns when the hard limit is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + reserve
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("serving.max_connections=%d needs ~%d file descriptors, the limit is %d: "
                        "lower it or raise `ulimit -n`", connections, want, new)


async def start_server(slot: ModelSlot, *, host: str, port: int, model_name: str, max_message_bytes: int,
                       max_batch: int, max_text_chars: int, admin: AdminHandler | None,
                       admin_token: str | None, predict_token: str | None, tls_cert: Path | None,
                       tls_key: Path | None, coalesce_texts: bool = True, max_request_chars: int | None = None,
                       max_top_k: int | None = None, embed_slice_chars: int | None = None,
                       connections: ConnectionLimits | None = None, predictor: Predictor | None = None,
                       unknown: UnknownPolicy | None = None, review: ReviewQueue | None = None,
                       rejection: Rejection | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving ``slot`` on ``host:port`` (0 picks a free port); return the server and bound port.

    ``predictor`` lets another surface (OIP v2 over HTTP/REST) share its limits and text coalescing;
    by default one is built from the per-request limits (``common.Limits``) and ``coalesce_texts``.
    ``connections`` bounds connections (default ``ConnectionLimits()``). ``unknown`` (default: on,
    ``"<unknown>"``) says how out-of-scope answers look; ``review`` gets the rejected and low-margin
    predictions of both APIs (the caller owns and closes it); ``rejection`` (both in one, shared with
    another surface) wins over them. TLS is used iff both ``tls_cert`` and
    ``tls_key`` are given (PEM files). Raises ``ConfigError`` if the port cannot be bound or only one
    of the TLS files is given.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("serving.tls_cert and serving.tls_key must be set together")
    connections = connections or ConnectionLimits()
    raise_fd_limit(connections.max_connections)
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
               *connection_options(connections)]
    # The interceptor costs every call an extra await, so it is only installed when a token is set.
    interceptors = [TokenAuth(admin_token=admin_token, predict_token=predict_token)] if (
        admin_token or predict_token) else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    if predictor is None:
        limits = Limits(max_batch=max_batch, max_text_chars=max_text_chars, max_request_chars=max_request_chars,
                        max_top_k=max_top_k, max_response_bytes=max_message_bytes,
                        embed_slice_chars=embed_slice_chars)
        predictor = Predictor(slot, limits, coalesce_texts=coalesce_texts)
    rejection = rejection or Rejection(unknown or UnknownPolicy(), review)
    eddy_grpc.add_InferenceServicer_to_server(InferenceServicer(predictor, model_name, rejection), server)
    eddy_grpc.add_AdminServicer_to_server(AdminServicer(admin, loopback_only=not admin_token), server)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(predictor, model_name, rejection), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    bound = _bind(server, host, port, tls_cert, tls_key)
    if admin is not None and not admin_token and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving.admin_token is unset: admin RPCs on %s:%d answer loopback callers only", host, bound)
    stop_following = await _follow_health(slot, health_servicer)
    await server.start()
    log.info("gRPC server listening on %s:%d (%s)", host, bound, "TLS" if tls_cert else "insecure")

    async def stopper() -> None:
        stop_following()
        await health_servicer.enter_graceful_shutdown()

    _STOPPERS[server] = stopper
    return server, bound


async def stop_server(server: grpc.aio.Server, grace: float) -> None:
    """Report NOT_SERVING, then stop, giving in-flight calls ``grace`` seconds."""
    stopper = _STOPPERS.pop(server, None)
    if stopper is not None:
        await stopper()
    await server.stop(grace)


def _bind(server: grpc.aio.Server, host: str, port: int, cert: Path | None, key: Path | None) -> int:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if cert is not None and key is not None:
            credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except OSError as exc:
        raise ConfigError(f"serving TLS files: {exc}") from None
    except RuntimeError as exc:  # grpc raises RuntimeError when the port is taken
        raise ConfigError(f"serving.grpc_port: cannot bind {address}: {exc}") from None
    if bound == 0:
        raise ConfigError(f"serving.grpc_port: cannot bind {address}")
    return bound


async def _follow_health(slot: ModelSlot, servicer: health.aio.HealthServicer) -> Callable[[], None]:
    """Keep health statuses in step with the slot; return a function that stops following."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    one_at_a_time = asyncio.Lock()

    async def mark() -> None:
        # Serialised and reading the slot inside the lock, so the last mark always wins with the
        # slot's latest state (a slot never goes back to empty).
        async with one_at_a_time:
            serving = slot.get() is not None
            status = SERVING if serving else NOT_SERVING
            for name in _HEALTH_NAMES:
                await servicer.set(name, status)

    def on_swap(model: ServedModel) -> None:
        def schedule() -> None:
            task = loop.create_task(mark())
            pending.add(task)
            task.add_done_callback(pending.discard)

        try:
            loop.call_soon_threadsafe(schedule)
        except RuntimeError:  # the loop is closed: this server is gone
            slot.remove_listener(on_swap)

    slot.add_listener(on_swap)  # before reading the slot, so no swap falls between the two
    await mark()
    return lambda: slot.remove_listener(on_swap)
