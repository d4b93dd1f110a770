"""A real OIP v2 HTTP/REST server (and, beside it, the gRPC server sharing its predictor) in a thread."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.models.served import ModelSlot
from service.serving.grpc.common import Limits, Predictor
from service.serving.grpc.oip_v2 import OipServicer
from service.serving.grpc.server import start_server, stop_server
from service.serving.rest.app import start_rest, stop_rest
from tests.service.grpc_fixtures import ServerThread


@contextmanager
def running_servers(slot: ModelSlot, *, max_body_bytes: int = 1 << 20, predict_token: str | None = None,
                    tls: tuple[Path, Path] | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``("http(s)://127.0.0.1:<port>", "127.0.0.1:<grpc port>")``, both over one predictor."""
    cert, key = tls or (None, None)
    predictor = Predictor(slot, Limits(max_batch=64, max_text_chars=200))
    thread = ServerThread()
    try:
        runner, port = thread.run(start_rest(OipServicer(predictor, "eddy"), host="127.0.0.1", port=0,
                                             max_body_bytes=max_body_bytes, predict_token=predict_token,
                                             admin_token=None, grace=1.0, tls_cert=cert, tls_key=key))
        server, grpc_port = thread.run(start_server(
            slot, host="127.0.0.1", port=0, model_name="eddy", max_message_bytes=max_body_bytes,
            max_batch=64, max_text_chars=200, admin=None, admin_token=None, predict_token=predict_token,
            tls_cert=cert, tls_key=key, predictor=predictor))
        try:
            yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
        finally:
            thread.run(stop_server(server, 1.0))
            thread.run(stop_rest(runner))
    finally:
        thread.close()


def call(url: str, body: bytes | dict[str, Any] | None = None, *, headers: dict[str, str] | None = None,
         method: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    """``(status, parsed JSON body)`` of one HTTP request; error statuses are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
