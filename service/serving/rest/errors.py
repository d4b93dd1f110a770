"""Errors over HTTP: one status per gRPC code, and a JSON body ``{"error": "..."}`` saying what to do.

A failure a client can cause is never a 500: the core raises ``RequestError`` with a status code,
and this table turns it into the HTTP status KServe and Triton use for the same failure.
"""

from __future__ import annotations

import grpc
import orjson
from aiohttp import web

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status for a gRPC status code (500 for codes that mean a fault inside eddy)."""
    return HTTP_STATUS.get(code, 500)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return web.Response(status=status, body=orjson.dumps({"error": message}),
                        content_type="application/json", headers=headers)


def json_response(doc: object, status: int = 200) -> web.Response:
    """``doc`` as JSON (orjson: numpy-free, several times faster than the standard library)."""
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")
