"""The Open Inference Protocol v2 (KServe / Triton ``inference.GRPCInferenceService``).

Any OIP client (``tritonclient.grpc``, KServe tooling) can use eddy as one model, ``model_name``:

* inputs: ``TEXT`` BYTES ``[n]`` (only if this server has a backbone) or ``FEATURES`` FP32 ``[n, d]``,
  exactly one of them, sent in ``raw_input_contents`` (BYTES as 4-byte little-endian length + bytes,
  as tritonclient sends them) or in ``contents``;
* outputs: ``LABEL`` BYTES ``[n, top_k]`` and ``PROBABILITY`` FP32 ``[n, top_k]``, most probable first
  (in-scope labels), ``UNKNOWN`` BOOL ``[n]`` (rejected as out of scope: answer with the unknown
  label) and ``SCORE`` FP32 ``[n]`` (the rejection score), always in ``raw_output_contents``;
  ``top_k`` is an optional request parameter (default 1), ``unknown`` (bool, default true) turns
  rejection off for the request when false;
* the served version is ``response.model_version`` and the ``model_version`` response parameter;
* a request naming ``model_version`` is answered by exactly that version if it is one of the
  ``serving.versions_loaded`` newest, NOT_FOUND (listing them) otherwise.

``OipServicer``'s plain methods (``infer``, ``metadata``, ``model_ready``, ``server_ready``) are the
protocol's core, free of any transport: the gRPC handlers call them, and so does OIP v2 over
HTTP/REST (``service.serving.rest``), which only translates JSON to and from these messages.

Only the methods above and the metadata/readiness calls are implemented; the rest (shared memory,
repository control, statistics, streaming) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import struct
from importlib import metadata
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.models.served import ServedModel
from service.serving.grpc.common import Predictor, RequestError, Scored, Timing, invalid, not_loaded, rpc
from service.serving.unknown import Rejection, UnknownPolicy

TEXT, FEATURES = "TEXT", "FEATURES"
LABEL, PROBABILITY, UNKNOWN, SCORE = "LABEL", "PROBABILITY", "UNKNOWN", "SCORE"
OUTPUTS = (LABEL, PROBABILITY, UNKNOWN, SCORE)


def server_version() -> str:
    """The installed eddy package version."""
    try:
        return metadata.version("eddy")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP v2 over the slot's current model, published as ``model_name``."""

    def __init__(self, predictor: Predictor, model_name: str, rejection: Rejection | None = None) -> None:
        self.predictor = predictor
        self.model_name = model_name
        self.version = server_version()
        self.rejection = rejection or Rejection(UnknownPolicy())

    # -- health and metadata --------------------------------------------------------------------
    @rpc("ServerLive")
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any,
                         timing: Timing) -> pb.ServerLiveResponse:
        """Live whenever the process answers."""
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any,
                          timing: Timing) -> pb.ServerReadyResponse:
        """Ready once a model is served."""
        return pb.ServerReadyResponse(ready=self.server_ready())

    @rpc("ModelReady")
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any,
                         timing: Timing) -> pb.ModelReadyResponse:
        """Ready iff the name is ours, a model is served, and the version (if given) is loaded."""
        return pb.ModelReadyResponse(ready=self.model_ready(request.name, request.version))

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any,
                             timing: Timing) -> pb.ServerMetadataResponse:
        """Name ``eddy``, the package version, no extensions."""
        return pb.ServerMetadataResponse(name="eddy", version=self.version, extensions=[])

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any,
                            timing: Timing) -> pb.ModelMetadataResponse:
        """Inputs, outputs and the loaded versions."""
        return self.metadata(request.name, request.version)

    @rpc("ModelInfer")
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any,
                         timing: Timing) -> pb.ModelInferResponse:
        """Top-k labels and probabilities for a batch of texts or feature rows."""
        return await self.infer(request, timing)

    # -- the protocol's core, shared with HTTP/REST ---------------------------------------------
    def server_ready(self) -> bool:
        """Whether a model is served."""
        return self.predictor.slot.get() is not None

    def model_ready(self, name: str, version: str) -> bool:
        """Whether ``name`` is ours, a model is served, and ``version`` (if not "") is loaded."""
        if name != self.model_name or self.predictor.slot.get() is None:
            return False
        return version == "" or (version.isdigit() and self.predictor.slot.find(int(version)) is not None)

    def metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        """Inputs, outputs and the loaded versions (oldest first) of ``name`` at ``version``."""
        model = self.model(name, version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        inputs = [tensor(name=FEATURES, datatype="FP32", shape=[-1, model.n_features])]
        if model.backbone is not None:
            inputs.insert(0, tensor(name=TEXT, datatype="BYTES", shape=[-1]))
        outputs = [tensor(name=LABEL, datatype="BYTES", shape=[-1, -1]),
                   tensor(name=PROBABILITY, datatype="FP32", shape=[-1, -1]),
                   tensor(name=UNKNOWN, datatype="BOOL", shape=[-1]),
                   tensor(name=SCORE, datatype="FP32", shape=[-1])]
        versions = [str(v) for v in reversed(self.predictor.slot.loaded_versions())]
        response = pb.ModelMetadataResponse(name=self.model_name, versions=versions,
                                            platform="onnxruntime_onnx", inputs=inputs, outputs=outputs)
        response.MergeFromString(metadata_parameters({"backbone": model.backbone_identity or "none",
                                                      "head_kind": model.head_kind}))
        return response

    async def infer(self, request: pb.ModelInferRequest, timing: Timing) -> pb.ModelInferResponse:
        """Top-k labels and probabilities for a batch of texts or feature rows; ``RequestError`` if not."""
        model = self.model(request.model_name, request.model_version)
        k = self.predictor.top_k(model, _int_parameter(request.parameters, "top_k", default=1))
        reject = _bool_parameter(request.parameters, "unknown", default=True)
        wanted = _requested_outputs(request)
        if len(request.inputs) != 1:
            names = [t.name for t in request.inputs]
            raise invalid(f"send exactly one input, {TEXT} or {FEATURES}; got {names or 'none'}")
        if request.raw_input_contents and len(request.raw_input_contents) != 1:
            raise invalid(f"got {len(request.raw_input_contents)} raw_input_contents for 1 input")
        tensor = request.inputs[0]
        raw = request.raw_input_contents[0] if request.raw_input_contents else None
        if tensor.name == FEATURES:
            timing.input = "features"
            scored = await self.predictor.scored_features(model, _features(tensor, raw, model.n_features))
            inputs: list[str] | np.ndarray = scored.X
        elif tensor.name == TEXT:
            timing.input = "text"
            inputs = _texts(tensor, raw)
            scored = await self.predictor.scored_texts(model, inputs)
        else:
            raise invalid(f"unknown input {tensor.name!r}: expected {TEXT} (BYTES [n]) "
                          f"or {FEATURES} (FP32 [n, d])")
        unknown = self.rejection.apply("oip_v2", model, scored.probs, scored.score, inputs, enabled=reject)
        return await self.predictor.answer(
            model, scored.probs, k, lambda order, top: self._response(request, model, order, top, scored, unknown,
                                                                      wanted))

    def _response(self, request: pb.ModelInferRequest, model: ServedModel, order: np.ndarray, top: np.ndarray,
                  scored: Scored, unknown: np.ndarray, wanted: list[str]) -> pb.ModelInferResponse:
        probs = scored.probs
        top = top.astype("<f4")
        k = order.shape[1]
        response = pb.ModelInferResponse(model_name=self.model_name, model_version=str(model.version),
                                         id=request.id)
        response.parameters["model_version"].int64_param = model.version
        shape = [len(order), k]
        for name in wanted:
            if name == LABEL:
                labels = [model.classes[j].encode() for j in order.ravel().tolist()]
                raw = b"".join(struct.pack("<I", len(b)) + b for b in labels)
                response.outputs.add(name=LABEL, datatype="BYTES", shape=shape)
            elif name == PROBABILITY:
                raw = top.tobytes()
                response.outputs.add(name=PROBABILITY, datatype="FP32", shape=shape)
            elif name == UNKNOWN:
                raw = np.asarray(unknown, dtype=bool).tobytes()  # BOOL: one byte per element
                response.outputs.add(name=UNKNOWN, datatype="BOOL", shape=[len(probs)])
            else:
                raw = np.asarray(scored.score, dtype="<f4").tobytes()
                response.outputs.add(name=SCORE, datatype="FP32", shape=[len(probs)])
            response.raw_output_contents.append(raw)
        return response

    def model(self, name: str, version: str) -> ServedModel:
        """The model ``name``/``version`` designate ("" = the served one); NOT_FOUND / UNAVAILABLE otherwise."""
        if name != self.model_name:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown model {name!r}: this server serves {self.model_name!r}")
        if version == "":
            return self.predictor.model()
        if not version.isdigit():
            self.predictor.model()  # UNAVAILABLE before the first model, as for any version
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               not_loaded(repr(version), self.predictor.slot.loaded_versions()))
        return self.predictor.model(int(version))


def _requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    names = [o.name for o in request.outputs] or list(OUTPUTS)
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown:
        raise invalid(f"unknown outputs {unknown}: expected some of {', '.join(OUTPUTS)}")
    return names


def _bool_parameter(parameters: Any, key: str, *, default: bool) -> bool:
    if key not in parameters:
        return default
    param = parameters[key]
    kind = param.WhichOneof("parameter_choice")
    if kind == "bool_param":
        return bool(param.bool_param)
    if kind == "string_param" and param.string_param.strip().lower() in ("true", "false"):
        return param.string_param.strip().lower() == "true"
    raise invalid(f"parameter {key!r} must be a boolean, got {kind}")


def metadata_parameters(values: dict[str, str]) -> bytes:
    """``ModelMetadataResponse.parameters`` (field 6, ``map<string, InferParameter>``) as wire bytes.

    The Open Inference Protocol's proto (KServe, MLServer) has this map; tritonclient's compiled
    proto predates it, so the entries travel as an unknown field that protobuf keeps and
    serialises: clients built from the OIP proto read them as ``parameters``.
    """
    out = b""
    for key, value in values.items():
        k = key.encode()
        v = pb.InferParameter(string_param=value).SerializeToString()
        entry = b"\x0a" + _varint(len(k)) + k + b"\x12" + _varint(len(v)) + v
        out += b"\x32" + _varint(len(entry)) + entry  # field 6, length-delimited
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int_parameter(parameters: Any, key: str, *, default: int) -> int:
    if key not in parameters:
        return default
    param = parameters[key]
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(param, kind))
    if kind == "string_param" and param.string_param.strip().lstrip("-").isdigit():
        return int(param.string_param)
    raise invalid(f"parameter {key!r} must be an integer, got {kind}")


def _shape(name: str, shape: list[int], ndim: int, expected: str) -> list[int]:
    if len(shape) != ndim or any(s < 0 for s in shape):
        raise invalid(f"input {name} has shape {shape}; expected {expected}")
    return shape


def _features(tensor: Any, raw: bytes | None, d: int) -> np.ndarray:
    """FP32 ``[n, d]`` from raw little-endian bytes or ``fp32_contents``."""
    if tensor.datatype != "FP32":
        raise invalid(f"input {FEATURES} has datatype {tensor.datatype}; expected FP32 with shape [n, {d}]")
    n, width = _shape(FEATURES, list(tensor.shape), 2, f"[n, {d}]")
    if width != d:
        raise invalid(f"got {width} features, expected {d} (input {FEATURES} shape [n, {d}])")
    if raw is not None:
        if len(raw) != 4 * n * width:
            raise invalid(f"input {FEATURES}: shape [{n}, {width}] needs {4 * n * width} bytes, "
                          f"got {len(raw)}")
        values = np.frombuffer(raw, dtype="<f4")
    else:
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
        if values.size != n * width:
            raise invalid(f"input {FEATURES}: shape [{n}, {width}] needs {n * width} values, "
                          f"got {values.size}")
    return values.astype(np.float32, copy=False).reshape(n, width)


def _texts(tensor: Any, raw: bytes | None) -> list[str]:
    """BYTES ``[n]`` (or ``[n, 1]``) as UTF-8 strings, from length-prefixed raw bytes or contents."""
    if tensor.datatype != "BYTES":
        raise invalid(f"input {TEXT} has datatype {tensor.datatype}; expected BYTES with shape [n]")
    shape = list(tensor.shape)
    if len(shape) == 2 and shape[1] == 1:
        shape = shape[:1]
    (n,) = _shape(TEXT, shape, 1, "[n] (or [n, 1])")
    items = _unpack_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
    if len(items) != n:
        raise invalid(f"input {TEXT}: shape [{n}] but {len(items)} strings were sent")
    try:
        return [item.decode("utf-8") for item in items]
    except UnicodeDecodeError:
        raise invalid(f"input {TEXT}: strings must be UTF-8") from None


def _unpack_bytes(raw: bytes) -> list[bytes]:
    """Split tritonclient's BYTES serialisation: repeated (uint32 little-endian length, bytes)."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise invalid(f"input {TEXT}: truncated length prefix at byte {pos}")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise invalid(f"input {TEXT}: string at byte {pos} claims {size} bytes, "
                          f"only {len(raw) - pos} remain")
        items.append(raw[pos:pos + size])
        pos += size
    return items
