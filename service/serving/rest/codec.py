"""JSON (and binary tensor data) to and from the OIP v2 messages the core answers.

Request body: a JSON object ``{"id"?, "parameters"?, "inputs": [...], "outputs"?: [...]}``; each
input is ``{"name", "shape", "datatype", "data"}`` with ``data`` a flat or nested list (BYTES as
strings), or, with Triton's binary tensor data extension, ``"parameters": {"binary_data_size": n}``
and its bytes after the JSON, whose length the ``Inference-Header-Content-Length`` header gives.
Binary data is the OIP raw layout: little-endian values; BYTES as (uint32 length, bytes) each.

Response: ``{"model_name", "model_version", "id"?, "parameters", "outputs": [...]}``, each output's
``data`` flat in row-major order, or its bytes appended after the JSON when the request asked for
binary data (``"parameters": {"binary_data": true}`` on the output, or ``binary_data_output`` on the
request). Every malformed request raises ``RequestError`` (INVALID_ARGUMENT) naming what was expected.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb

from service.serving.grpc.common import invalid

HEADER_LENGTH = "Inference-Header-Content-Length"
EXAMPLE = '{"inputs": [{"name": "FEATURES", "shape": [1, d], "datatype": "FP32", "data": [[...]]}]}'
# Raw layouts of the numeric datatypes (OIP v2 "Tensor Data Types"); BYTES is handled apart.
DTYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}

Binary = Callable[[str], bool]


def infer_request(body: bytes, header_length: str | None, *, model_name: str,
                  version: str) -> tuple[pb.ModelInferRequest, Binary]:
    """The request ``body`` as an OIP message, and which outputs to answer as binary data."""
    head, binary = _split(body, header_length)
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"malformed JSON ({exc}); expected an inference request such as {EXAMPLE}") from None
    if not isinstance(doc, dict):
        raise invalid(f"expected a JSON object such as {EXAMPLE}, got a {type(doc).__name__}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid(f'missing "inputs": expected a non-empty list of tensors, as in {EXAMPLE}')
    request = pb.ModelInferRequest(model_name=model_name, model_version=version, id=str(doc.get("id", "")))
    params = _object(doc.get("parameters"), "parameters")
    binary_default = bool(params.pop("binary_data_output", False))
    _set_parameters(request.parameters, params)
    offset = 0
    for i, item in enumerate(inputs):
        raw, offset = _input(request, i, _object(item, f"inputs[{i}]"), binary, offset)
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size total "
                      f"of {offset}")
    wanted: dict[str, bool] = {}
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise invalid('"outputs" must be a list such as [{"name": "LABEL"}]')
    for i, item in enumerate(outputs):
        out = _object(item, f"outputs[{i}]")
        if not isinstance(out.get("name"), str):
            raise invalid(f'outputs[{i}] needs a "name" (LABEL or PROBABILITY)')
        request.outputs.add(name=out["name"])
        wanted[out["name"]] = bool(_object(out.get("parameters"), "parameters").get("binary_data", binary_default))
    return request, lambda name: wanted.get(name, binary_default)


def infer_response(response: pb.ModelInferResponse, binary: Binary) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length if binary data follows it (else ``None``)."""
    outputs, blobs = [], []
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if binary(out.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _decode(out.datatype, raw)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    doc["parameters"] = {k: _parameter_value(v) for k, v in response.parameters.items()}
    doc["outputs"] = outputs
    head = orjson.dumps(doc)
    return (head, None) if not blobs else (head + b"".join(blobs), len(head))


def metadata(response: pb.ModelMetadataResponse) -> dict[str, Any]:
    """Model metadata as KServe's ``$metadata_model_response`` JSON."""
    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {"name": response.name, "versions": list(response.versions), "platform": response.platform,
            "inputs": tensors(response.inputs), "outputs": tensors(response.outputs)}


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise invalid(f"{HEADER_LENGTH} must be an integer byte count, got {header_length!r}") from None
    if not 0 <= n <= len(body):
        raise invalid(f"{HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
    return body[:n], body[n:]


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{where} must be a JSON object, got {type(value).__name__}")
    return dict(value)


def _input(request: pb.ModelInferRequest, i: int, item: dict[str, Any], binary: bytes,
           offset: int) -> tuple[bytes, int]:
    """Add input ``i``'s tensor to ``request``; its raw bytes and the new offset into ``binary``."""
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise invalid(f'inputs[{i}] needs "name" and "datatype" strings, e.g. "FEATURES" and "FP32"')
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise invalid(f"input {name}: shape must be a list of non-negative integers, got {shape!r}")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    size = _object(item.get("parameters"), f"input {name} parameters").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise invalid(f"input {name}: binary_data_size must be a non-negative integer, got {size!r}")
        if offset + size > len(binary):
            raise invalid(f"input {name}: binary_data_size {size} at byte {offset}, but only "
                          f"{len(binary) - offset} bytes of binary data were sent")
        return binary[offset:offset + size], offset + size
    if "data" not in item:
        raise invalid(f'input {name}: no "data": send a flat or nested list, or binary data')
    return _encode(name, datatype, shape, item["data"]), offset


def _encode(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """JSON ``data`` in the OIP raw layout of ``datatype``."""
    if datatype == "BYTES":
        items = list(_flatten(data)) if isinstance(data, list) else [data]
        if not all(isinstance(s, str) for s in items):
            raise invalid(f"input {name}: BYTES data must be strings")
        encoded = [s.encode("utf-8") for s in items]
        return b"".join(struct.pack("<I", len(b)) + b for b in encoded)
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise invalid(f"input {name}: unknown datatype {datatype!r}; expected one of BYTES, {', '.join(DTYPES)}")
    try:
        values = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise invalid(f"input {name}: data must be a flat or nested list of {datatype} numbers with shape "
                      f"{shape} ({exc})") from None
    if values.size != math.prod(shape):
        raise invalid(f"input {name}: shape {shape} needs {math.prod(shape)} values, got {values.size}")
    return values.tobytes()


def _flatten(data: list[Any]) -> Iterator[Any]:
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def _decode(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            (size,) = struct.unpack_from("<I", raw, pos)
            items.append(raw[pos + 4:pos + 4 + size].decode("utf-8", errors="replace"))
            pos += 4 + size
        return items
    return list(np.frombuffer(raw, dtype=DTYPES[datatype]).tolist())


def _set_parameters(parameters: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            parameters[key].bool_param = value
        elif isinstance(value, int):
            if not -2**63 <= value < 2**63:
                raise invalid(f"parameter {key!r} is out of the int64 range: {value}")
            parameters[key].int64_param = value
        elif isinstance(value, float):
            parameters[key].double_param = value
        elif isinstance(value, str):
            parameters[key].string_param = value
        else:
            raise invalid(f"parameter {key!r} must be a boolean, number or string, got {type(value).__name__}")


def _parameter_value(param: Any) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None
