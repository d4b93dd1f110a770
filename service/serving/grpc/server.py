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
import weakref
from collections.abc import Awaitable, Callable
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


async def start_server(slot: ModelSlot, *, host: str, port: int, model_name: str, max_message_bytes: int,
                       max_batch: int, max_text_chars: int, admin: AdminHandler | None,
                       admin_token: str | None, predict_token: str | None, tls_cert: Path | None,
                       tls_key: Path | None, coalesce_texts: bool = True, unknown: UnknownPolicy | None = None,
                       review: ReviewQueue | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving ``slot`` on ``host:port`` (0 picks a free port); return the server and bound port.

    ``unknown`` (default: on, ``"<unknown>"``) says how out-of-scope answers look; ``review`` gets
    the rejected and low-margin predictions of both APIs (the caller owns and closes it).

    TLS is used iff both ``tls_cert`` and ``tls_key`` are given (PEM files). Raises ``ConfigError``
    if the port cannot be bound or only one of the TLS files is given.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("serving.tls_cert and serving.tls_key must be set together")
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]  # a second server on a taken port must fail, not share it
    # The interceptor costs every call an extra await, so it is only installed when a token is set.
    interceptors = [TokenAuth(admin_token=admin_token, predict_token=predict_token)] if (
        admin_token or predict_token) else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    predictor = Predictor(slot, Limits(max_batch=max_batch, max_text_chars=max_text_chars),
                          coalesce_texts=coalesce_texts)
    rejection = Rejection(unknown or UnknownPolicy(), review)
    eddy_grpc.add_InferenceServicer_to_server(InferenceServicer(predictor, model_name, rejection), server)
    eddy_grpc.add_AdminServicer_to_server(AdminServicer(admin), server)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(predictor, model_name, rejection), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    bound = _bind(server, host, port, tls_cert, tls_key)
    if admin is not None and admin_token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("admin RPCs are open to anyone who can reach %s:%d: set serving.admin_token", host, bound)
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
