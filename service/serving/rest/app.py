"""Routes of OIP v2 over HTTP/REST, and the server's lifecycle (aiohttp, in the daemon's event loop).

==========================================================  =======================================
``GET  /v2/health/live``, ``/v2/health/ready``               200 (ready: 503 before the first model)
``GET  /v2``                                                 server metadata
``GET  /v2/models/{name}[/versions/{version}]``              model metadata, the loaded versions
``GET  /v2/models/{name}[/versions/{version}]/ready``        200 if loaded, 404 / 503 otherwise
``POST /v2/models/{name}[/versions/{version}]/infer``        inference (``codec`` has the format)
==========================================================  =======================================

With ``serving.predict_token`` set, all but the health routes need ``Authorization: Bearer <token>``
(the admin token is accepted too), as over gRPC. Each call is counted in
``eddy_requests_total{rpc="rest.<Call>", code}`` and inference timed in ``eddy_predict_seconds``.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from aiohttp import web

from service.errors import ConfigError
from service.metrics import PREDICT_SECONDS, REQUESTS
from service.serving.grpc.auth import bearer
from service.serving.grpc.common import RequestError, Timing
from service.serving.grpc.oip_v2 import OipServicer, server_version
from service.serving.rest import codec
from service.serving.rest.errors import error_response, http_status, json_response

log = logging.getLogger(__name__)

Handler = Callable[[web.Request, Timing], Awaitable[web.StreamResponse]]
ROUTES = ("GET /v2/health/live", "GET /v2/health/ready", "GET /v2", "GET /v2/models/{name}",
          "GET /v2/models/{name}/ready", "POST /v2/models/{name}/infer",
          "... and each under /v2/models/{name}/versions/{version}")


class RestApi:
    """The handlers, over one ``OipServicer`` (the OIP core that gRPC uses too)."""

    def __init__(self, oip: OipServicer, *, tokens: list[str]) -> None:
        self.oip = oip
        self.tokens = [t.encode() for t in tokens]

    def app(self, max_body_bytes: int) -> web.Application:
        """The aiohttp application, refusing bodies over ``max_body_bytes`` with 413."""
        app = web.Application(client_max_size=max_body_bytes, middlewares=[_json_errors(max_body_bytes)])
        route = app.router
        route.add_get("/v2/health/live", self._call("ServerLive", self.live, open_=True))
        route.add_get("/v2/health/ready", self._call("ServerReady", self.ready, open_=True))
        route.add_get("/v2", self._call("ServerMetadata", self.server))
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            route.add_get(base, self._call("ModelMetadata", self.metadata))
            route.add_get(base + "/ready", self._call("ModelReady", self.model_ready))
            route.add_post(base + "/infer", self._call("ModelInfer", self.infer))
        return app

    # -- handlers -------------------------------------------------------------------------------
    async def live(self, request: web.Request, timing: Timing) -> web.Response:
        """Live whenever the process answers."""
        return json_response({"live": True})

    async def ready(self, request: web.Request, timing: Timing) -> web.Response:
        """200 once a model is served, 503 before."""
        ready = self.oip.server_ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    async def server(self, request: web.Request, timing: Timing) -> web.Response:
        """Name, version and the extensions this endpoint speaks."""
        return json_response({"name": "eddy", "version": server_version(),
                              "extensions": ["binary_tensor_data"]})

    async def metadata(self, request: web.Request, timing: Timing) -> web.Response:
        """Inputs, outputs and loaded versions; 404 naming what exists for an unknown model/version."""
        name, version = _target(request)
        return json_response(codec.metadata(self.oip.metadata(name, version)))

    async def model_ready(self, request: web.Request, timing: Timing) -> web.Response:
        """200 if the model (at the version) can answer; 404 / 503 saying why not."""
        name, version = _target(request)
        self.oip.metadata(name, version)  # raises NOT_FOUND / UNAVAILABLE with the reason
        return json_response({"name": name, "ready": True})

    async def infer(self, request: web.Request, timing: Timing) -> web.Response:
        """Decode, answer through the OIP core, encode (as JSON, or JSON then binary data)."""
        name, version = _target(request)
        self.oip.model(name, version)  # an unknown model or version is a 404 whatever the body says
        body = await request.read()
        message, binary = codec.infer_request(body, request.headers.get(codec.HEADER_LENGTH),
                                              model_name=name, version=version)
        answer, header_length = codec.infer_response(await self.oip.infer(message, timing), binary)
        if header_length is None:
            return web.Response(body=answer, content_type="application/json")
        return web.Response(body=answer, content_type="application/octet-stream",
                            headers={codec.HEADER_LENGTH: str(header_length)})

    # -- what every call goes through -----------------------------------------------------------
    def _call(self, rpc: str, handler: Handler, *, open_: bool = False
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Check the token, run ``handler``, translate ``RequestError``, count and time the call."""
        label = f"rest.{rpc}"

        async def run(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            timing = Timing()
            code = grpc.StatusCode.OK
            try:
                if not open_ and self.tokens:
                    self._authenticate(request)
                response = await handler(request, timing)
            except RequestError as exc:
                code = exc.code
                headers = {"WWW-Authenticate": "Bearer"} if code == grpc.StatusCode.UNAUTHENTICATED else None
                return error_response(http_status(code), exc.message, headers)
            except web.HTTPRequestEntityTooLarge:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", label)
                return error_response(500, f"{rpc} failed inside eddy; see the server log")
            finally:
                REQUESTS.labels(rpc=label, code=code.name).inc()
            if timing.input is not None:
                PREDICT_SECONDS.labels(rpc=label, input=timing.input).observe(time.perf_counter() - start)
            return response

        return run

    def _authenticate(self, request: web.Request) -> None:
        token = bearer([("authorization", request.headers.get("Authorization", ""))])
        if token is not None and any(hmac.compare_digest(token.encode(), t) for t in self.tokens):
            return
        why = "missing bearer token" if token is None else "invalid bearer token"
        raise RequestError(grpc.StatusCode.UNAUTHENTICATED, f"{why}: send header 'Authorization: Bearer <token>'")


def _target(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _json_errors(max_body_bytes: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Turn aiohttp's own refusals (no route, wrong method, body too large) into ``{"error"}`` JSON."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 413:
                message = (f"request body is over serving.max_message_bytes ({max_body_bytes} bytes): "
                           f"send fewer inputs per request")
            elif exc.status in (404, 405):
                message = (f"no such endpoint: {request.method} {request.path}; "
                           f"eddy answers {', '.join(ROUTES)}")
            else:
                message = exc.reason
            return error_response(exc.status, message)

    return middleware


async def start_rest(oip: OipServicer, *, host: str, port: int, max_body_bytes: int,
                     predict_token: str | None, admin_token: str | None, grace: float = 2.0,
                     tls_cert: Path | None = None, tls_key: Path | None = None) -> tuple[web.AppRunner, int]:
    """Serve OIP v2 over HTTP on ``host:port`` (0 picks a free port); the runner and the bound port.

    HTTPS iff ``tls_cert`` and ``tls_key`` (PEM files, the gRPC server's) are given.
    ``stop_rest(runner)`` gives in-flight requests ``grace`` seconds to finish.

    Raises ``ConfigError`` if the port cannot be bound.
    """
    tokens = [t for t in (predict_token, admin_token) if t] if predict_token else []
    runner = web.AppRunner(RestApi(oip, tokens=tokens).app(max_body_bytes), access_log=None,
                           handle_signals=False, shutdown_timeout=grace)
    await runner.setup()
    try:
        tls = None
        if tls_cert is not None and tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(tls_cert, tls_key)
        site = web.TCPSite(runner, host, port, reuse_port=False, ssl_context=tls)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"serving.http_port: cannot bind {host}:{port}: {exc.strerror}") from None
    bound = int(runner.addresses[0][1])
    log.info("OIP v2 over HTTP/REST listening on %s://%s:%d/v2", "https" if tls else "http", host, bound)
    return runner, bound


async def stop_rest(runner: web.AppRunner) -> None:
    """Stop accepting, give in-flight requests the ``grace`` seconds set at start, close."""
    await runner.cleanup()
