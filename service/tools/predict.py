"""``eddy predict`` and ``eddy rollback``: clients of a running eddy server over eddy.v1.

Uses a plain insecure channel unless ``tls_ca`` is given. Errors from the server are raised as
``ModelError`` whose message carries the gRPC status name and the server's explanation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from service.errors import ModelError
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc


def predict(addr: str, *, text: str | None, features: list[float] | None, top_k: int = 1,
            token: str | None = None, timeout: float = 5, tls_ca: Path | None = None) -> dict[str, Any]:
    """Ask the server at ``addr`` (``host:port``) for the ``top_k`` labels of one input.

    Exactly one of ``text`` / ``features`` must be given (``ValueError`` otherwise). Returns JSON-able
    ``{"label", "probability", "unknown", "score", "model_version", "top": [{"label", "probability"}, ...]}``:
    ``label`` is the answer (the unknown label when ``unknown``), ``top`` the in-scope labels.
    Raises ``ModelError`` (``"UNAVAILABLE: ..."``) if the call fails.
    """
    if (text is None) == (features is None):
        raise ValueError("give exactly one of text or features")
    request = pb.PredictRequest(top_k=top_k)
    if text is not None:
        request.text = text
    else:
        request.features.values.extend(features or [])
    with _channel(addr, tls_ca) as channel:
        try:
            response = pb_grpc.InferenceStub(channel).Predict(request, timeout=timeout, metadata=_auth(token))
        except grpc.RpcError as exc:
            raise ModelError(f"{exc.code().name}: {exc.details()} (server {addr})") from None
    top = [{"label": p.label, "probability": round(float(p.probability), 6)} for p in response.predictions]
    return {"label": response.label or top[0]["label"], "probability": top[0]["probability"],
            "unknown": response.unknown, "score": round(float(response.score), 6),
            "model_version": response.model_version, "top": top}


def rollback(addr: str, version: int | None = None, *, token: str | None = None, timeout: float = 30,
             tls_ca: Path | None = None) -> int:
    """Ask the server at ``addr`` to serve ``version`` (default: the one before current) again.

    Returns the NEW version now served (a rollback republishes, so versions only increase).
    Raises ``ModelError`` (``"NOT_FOUND: unknown model version 7; available: ..."``) if refused.
    """
    request = pb.RollbackRequest() if version is None else pb.RollbackRequest(version=version)
    with _channel(addr, tls_ca) as channel:
        try:
            response = pb_grpc.AdminStub(channel).Rollback(request, timeout=timeout, metadata=_auth(token))
        except grpc.RpcError as exc:
            raise ModelError(f"{exc.code().name}: {exc.details()} (server {addr})") from None
    return int(response.model_version)


def _auth(token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {token}")] if token else None


def _channel(addr: str, tls_ca: Path | None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(addr)
    return grpc.secure_channel(addr, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
