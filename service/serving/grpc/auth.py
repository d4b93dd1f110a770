"""Bearer-token checks for gRPC calls (metadata ``authorization: Bearer <token>``).

* ``admin_token`` set: every ``eddy.v1.Admin`` call needs it;
* ``predict_token`` set: every ``eddy.v1.Inference`` and ``inference.GRPCInferenceService`` (OIP v2)
  call needs it (the admin token is accepted there too);
* health checks and reflection are always open, so probes and tooling work.

A refused call ends with UNAUTHENTICATED before any handler runs. Tokens are compared in constant
time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from service.metrics import REQUESTS

ADMIN_SERVICE = "/eddy.v1.Admin/"
PREDICT_SERVICES = ("/eddy.v1.Inference/", "/inference.GRPCInferenceService/")


def bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token in an ``authorization: Bearer <token>`` metadata entry, or ``None``."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls that lack the token their service requires."""

    def __init__(self, *, admin_token: str | None, predict_token: str | None) -> None:
        self._admin = admin_token or None
        self._predict = predict_token or None

    def _accepted(self, method: str) -> list[str] | None:
        """Tokens that open ``method``, or ``None`` if it is open to all."""
        if method.startswith(ADMIN_SERVICE) and self._admin:
            return [self._admin]
        if method.startswith(PREDICT_SERVICES) and self._predict:
            return [t for t in (self._predict, self._admin) if t]
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass the call on if it carries an accepted token; otherwise answer UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        accepted = self._accepted(handler_call_details.method)
        if handler is None or accepted is None:
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        if token is not None and any(hmac.compare_digest(token.encode(), t.encode()) for t in accepted):
            return handler
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        return _refusal(handler, rpc, "missing bearer token" if token is None else "invalid bearer token")


def _refusal(handler: grpc.RpcMethodHandler, rpc: str, why: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that aborts with UNAUTHENTICATED."""
    message = f"{why}: send metadata 'authorization: Bearer <token>'"

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        REQUESTS.labels(rpc=rpc, code=grpc.StatusCode.UNAUTHENTICATED.name).inc()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
