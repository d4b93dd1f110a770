"""The eddy.v1 servicers: ``Inference`` (Predict, PredictBatch, ModelInfo) and ``Admin``.

Admin actions belong to the daemon that owns the learner; this module only translates them, through
the ``AdminHandler`` protocol, and maps their errors to status codes. Without an admin token the
Admin service answers only callers on this machine (loopback or a unix socket): others get
PERMISSION_DENIED, so a daemon listening on ``0.0.0.0`` is not an open forget/rollback endpoint.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
import numpy as np

from service.core.forget import MAX_IDS_PER_REQUEST
from service.errors import ModelError
from service.models.served import ServedModel
from service.serving.grpc.common import Predictor, RequestError, Timing, invalid, rpc
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
from service.serving.unknown import Rejection, UnknownPolicy


class AdminHandler(Protocol):
    """What the daemon implements for the Admin service.

    Raise ``ModelError`` or ``ValueError`` to refuse: a ``ModelError`` starting "unknown model version"
    becomes NOT_FOUND, any other FAILED_PRECONDITION; ``ValueError`` becomes INVALID_ARGUMENT.
    """

    async def rollback(self, version: int | None) -> int:
        """Serve an earlier model again, as a new version; return that new version."""

    async def export(self) -> int:
        """Export and swap in the learner's current head now; return the served version."""

    async def forget(self, ids: list[str], label: str | None) -> dict[str, Any]:
        """Forget events by id, or a whole label.

        Returns ``{"forgotten": int, "unknown": int, "memory_removed": int, "partial": bool}``, plus
        ``"published": "topic:partition@offset"`` where the request was only queued on the control
        topic (scale-out mode; sent back as trailing metadata ``eddy-forget-published``).
        """


def _predictions(model: ServedModel, order: np.ndarray, probs: np.ndarray) -> list[pb.Prediction]:
    classes = model.classes
    return [pb.Prediction(label=classes[j], probability=p)
            for j, p in zip(order.tolist(), probs.tolist(), strict=True)]


def _pinned(request: Any) -> int | None:
    return request.model_version if request.HasField("model_version") else None


class InferenceServicer(pb_grpc.InferenceServicer):
    """eddy.v1.Inference over the slot's current model."""

    def __init__(self, predictor: Predictor, model_name: str, rejection: Rejection | None = None) -> None:
        self.predictor = predictor
        self.model_name = model_name
        self.rejection = rejection or Rejection(UnknownPolicy())

    @rpc("Predict")
    async def Predict(self, request: pb.PredictRequest, context: Any, timing: Timing) -> pb.PredictResponse:
        """One input (text or features) -> its top_k labels."""
        model = self.predictor.model(_pinned(request))
        k = self.predictor.top_k(model, request.top_k)
        kind = request.WhichOneof("input")
        if kind == "features":
            timing.input = "features"
            values = request.features.values  # fromiter: ~2x faster than asarray on a repeated field
            row = np.fromiter(values, np.float32, len(values))[None, :]
            scored = await self.predictor.scored_features(model, row)
            inputs: list[str] | np.ndarray = scored.X
        elif kind == "text":
            timing.input = "text"
            inputs = [request.text]
            scored = await self.predictor.scored_texts(model, inputs)
        else:
            raise invalid("set exactly one input: text or features")
        unknown = self.rejection.apply("eddy.v1", model, scored.probs, scored.score, inputs,
                                       enabled=not request.keep_in_scope)

        def build(order: np.ndarray, top: np.ndarray) -> pb.PredictResponse:
            return pb.PredictResponse(predictions=_predictions(model, order[0], top[0]), model_version=model.version,
                                      label=self.rejection.label if unknown[0] else model.classes[int(order[0, 0])],
                                      unknown=bool(unknown[0]), score=float(scored.score[0]))

        return await self.predictor.answer(model, scored.probs, k, build)

    @rpc("PredictBatch")
    async def PredictBatch(self, request: pb.PredictBatchRequest, context: Any,
                           timing: Timing) -> pb.PredictBatchResponse:
        """Many inputs (all texts or all feature rows) -> top_k labels for each, in order."""
        model = self.predictor.model(_pinned(request))
        k = self.predictor.top_k(model, request.top_k)
        if request.texts and request.features:
            raise invalid("send texts or features, not both")
        if request.features:
            timing.input = "features"
            scored = await self.predictor.scored_features(model, _rows(request.features, model.n_features))
            inputs: list[str] | np.ndarray = scored.X
        else:
            timing.input = "text"
            inputs = list(request.texts)
            scored = await self.predictor.scored_texts(model, inputs)
        unknown = self.rejection.apply("eddy.v1", model, scored.probs, scored.score, inputs,
                                       enabled=not request.keep_in_scope).tolist()

        def build(order: np.ndarray, top: np.ndarray) -> pb.PredictBatchResponse:
            label = self.rejection.label
            results = [pb.PredictBatchResult(predictions=_predictions(model, idx, p),
                                             label=label if unk else model.classes[int(idx[0])], unknown=unk,
                                             score=s)
                       for idx, p, unk, s in zip(order, top, unknown, scored.score.tolist(), strict=True)]
            return pb.PredictBatchResponse(results=results, model_version=model.version)

        return await self.predictor.answer(model, scored.probs, k, build)

    @rpc("ModelInfo")
    async def ModelInfo(self, request: pb.ModelInfoRequest, context: Any,
                        timing: Timing) -> pb.ModelInfoResponse:
        """What is served now: version, classes (one page of them if they do not fit), input width, provenance."""
        model = self.predictor.model()
        if request.class_offset < 0 or request.class_limit < 0:
            raise invalid(f"class_offset and class_limit must be >= 0, got {request.class_offset} and "
                          f"{request.class_limit}")
        budget = (self.predictor.limits.max_response_bytes or 4 << 20) - INFO_RESERVE_BYTES
        unknown_label = self.rejection.label if self.rejection.policy.enabled else ""
        return info(model, self.model_name, offset=request.class_offset, limit=request.class_limit or None,
                    max_bytes=budget, unknown_label=unknown_label)


INFO_RESERVE_BYTES = 64 * 1024  # what ModelInfo holds besides the classes (offsets, names)


def info(model: ServedModel, model_name: str, *, offset: int = 0, limit: int | None = None, unknown_label: str = "",
         max_bytes: int | None = None) -> pb.ModelInfoResponse:
    """The ModelInfo answer for ``model``: classes from ``offset``, at most ``limit`` and ``max_bytes``.

    At least one class is listed when any remain, so paging always advances. ``unknown_label``
    empty: rejection is off on this server.
    """
    page = class_page(model.classes, offset, limit, max_bytes)
    return pb.ModelInfoResponse(
        model_name=model_name, model_version=model.version, classes=page,
        feature_dim=model.n_features, accepts_text=model.backbone is not None,
        head_kind=model.head_kind, backbone_identity=model.backbone_identity,
        created_at=model.created_at, source_offsets=model.source_offsets,
        classes_total=len(model.classes), class_offset=min(offset, len(model.classes)),
        unknown_threshold=model.unknown_threshold, unknown_label=unknown_label)


def class_page(classes: Sequence[str], offset: int, limit: int | None, max_bytes: int | None) -> list[str]:
    """``classes[offset:offset + limit]``, cut where their protobuf encoding passes ``max_bytes``."""
    page: list[str] = []
    size = 0
    for name in classes[offset:offset + limit if limit else None]:
        size += len(name.encode()) + 3  # tag and length of one repeated string
        if max_bytes is not None and page and size > max_bytes:
            break
        page.append(name)
    return page


def _rows(features: Any, d: int) -> np.ndarray:
    """Stack repeated ``Features`` into ``(n, d)`` float32, naming the first row of the wrong width."""
    for i, row in enumerate(features):
        if len(row.values) != d:
            raise invalid(f"features row {i}: got {len(row.values)} features, expected {d}")
    X = np.empty((len(features), d), dtype=np.float32)
    for i, row in enumerate(features):
        X[i] = np.fromiter(row.values, np.float32, d)
    return X


def is_loopback(peer: str) -> bool:
    """Whether a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:...``) is this machine."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


class AdminServicer(pb_grpc.AdminServicer):
    """eddy.v1.Admin, delegating to the daemon's ``AdminHandler`` (UNIMPLEMENTED without one)."""

    def __init__(self, handler: AdminHandler | None, *, loopback_only: bool = False) -> None:
        self.handler = handler
        self.loopback_only = loopback_only  # no admin token: only callers on this machine may act

    def _handler(self, context: Any) -> AdminHandler:
        if self.loopback_only and not is_loopback(context.peer()):
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                               "admin RPCs are accepted only from loopback while serving.admin_token is unset")
        if self.handler is None:
            raise RequestError(grpc.StatusCode.UNIMPLEMENTED,
                               "admin actions are not available in this process (serve-only role)")
        return self.handler

    @rpc("Rollback")
    async def Rollback(self, request: pb.RollbackRequest, context: Any,
                       timing: Timing) -> pb.RollbackResponse:
        """Serve an earlier version's model again, under a new, higher version."""
        version = request.version if request.HasField("version") else None
        with _refusals():
            new = await self._handler(context).rollback(version)
        return pb.RollbackResponse(model_version=new)

    @rpc("Export")
    async def Export(self, request: pb.ExportRequest, context: Any, timing: Timing) -> pb.ExportResponse:
        """Export the learner's head now."""
        with _refusals():
            version = await self._handler(context).export()
        return pb.ExportResponse(model_version=version)

    @rpc("Forget")
    async def Forget(self, request: pb.ForgetRequest, context: Any, timing: Timing) -> pb.ForgetResponse:
        """Forget events by id, or every event of a label."""
        label = request.label if request.HasField("label") else None
        if bool(request.ids) == (label is not None):
            raise invalid("set exactly one of ids or label")
        if len(request.ids) > MAX_IDS_PER_REQUEST:
            raise invalid(f"at most {MAX_IDS_PER_REQUEST} ids per forget request, got {len(request.ids)}")
        with _refusals():
            result = await self._handler(context).forget(list(request.ids), label)
        if "published" in result:  # scale-out: queued on the control topic, not yet applied
            context.set_trailing_metadata((("eddy-forget-published", str(result["published"])),))
        return pb.ForgetResponse(forgotten=int(result.get("forgotten", 0)),
                                 unknown=int(result.get("unknown", 0)),
                                 memory_removed=int(result.get("memory_removed", 0)),
                                 partial=bool(result.get("partial", False)))


class _refusals:
    """Map an admin handler's refusals to status codes (a context manager, used around one call)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, ModelError):
            unknown = str(exc).startswith("unknown model version")
            code = grpc.StatusCode.NOT_FOUND if unknown else grpc.StatusCode.FAILED_PRECONDITION
            raise RequestError(code, str(exc)) from None
        if isinstance(exc, ValueError):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
