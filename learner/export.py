"""A head's ``Readout`` as a small ONNX graph, its atomic file write, and the parity gate.

The graph (opset 17, built with ``onnx.helper``; no torch) computes exactly the ``Readout``
formula::

    features  float32 [N, d]
    phi       = Relu(features @ projection.T)         if a projection is set
              = features / max(|features|_2, 1e-12)   elif normalize
              = features                               otherwise
    scores    float32 [N, k] = phi @ weight + bias
    probabilities float32 [N, k] = Softmax(scores / temperature, axis=-1)
    unknown_score float32 [N]    = ReduceMax(probabilities, axis=1)   (learner.unknown: the MSP)

``scores`` is a second output (free: it is an intermediate anyway). ``metadata_props`` carry the
strings the caller passes (the service puts classes, model_version, backbone_identity, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from learner.files import atomic_write
from learner.heads.base import Readout

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
SCORES_NAME = "scores"
UNKNOWN_SCORE_NAME = "unknown_score"
OPSET = 17
_IR_VERSION = 8  # the IR that goes with opset 17; readable by every onnxruntime since 1.13


@dataclass(frozen=True)
class ParityResult:
    """Whether an ONNX session reproduces a readout on a probe batch."""

    ok: bool
    max_abs_diff: float
    reason: str


def readout_to_onnx(readout: Readout, *, metadata: dict[str, str]) -> onnx.ModelProto:
    """Build the ONNX graph of ``readout`` with ``metadata`` as its ``metadata_props``.

    Raises ``ValueError`` if the readout's arrays disagree in shape (the message names the
    numbers), if it has no classes, or if the temperature is not a positive finite number.
    Non-finite weights are *not* rejected here: the parity gate reports them.
    """
    d, k = _check_readout(readout)
    nodes: list[onnx.NodeProto] = []
    inits = [_init("weight", readout.weight), _init("bias", readout.bias),
             _init("inv_temperature", np.array(1.0 / readout.temperature))]
    phi = INPUT_NAME
    if readout.projection is not None:
        inits.append(_init("projection_t", np.asarray(readout.projection).T))
        nodes += [helper.make_node("MatMul", [INPUT_NAME, "projection_t"], ["projected"]),
                  helper.make_node("Relu", ["projected"], ["phi"])]
        phi = "phi"
    elif readout.normalize:
        inits.append(_init("min_norm", np.array(1e-12)))
        nodes += [helper.make_node("ReduceL2", [INPUT_NAME], ["norm"], axes=[1], keepdims=1),
                  helper.make_node("Max", ["norm", "min_norm"], ["safe_norm"]),
                  helper.make_node("Div", [INPUT_NAME, "safe_norm"], ["phi"])]
        phi = "phi"
    nodes += [helper.make_node("MatMul", [phi, "weight"], ["linear"]),
              helper.make_node("Add", ["linear", "bias"], [SCORES_NAME]),
              helper.make_node("Mul", [SCORES_NAME, "inv_temperature"], ["logits"]),
              helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1),
              helper.make_node("ReduceMax", [OUTPUT_NAME], [UNKNOWN_SCORE_NAME], axes=[1], keepdims=0)]
    graph = helper.make_graph(
        nodes, "eddy_head",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", k]),
         helper.make_tensor_value_info(SCORES_NAME, TensorProto.FLOAT, ["N", k]),
         helper.make_tensor_value_info(UNKNOWN_SCORE_NAME, TensorProto.FLOAT, ["N"])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="eddy", ir_version=_IR_VERSION)
    helper.set_model_props(model, {str(key): str(value) for key, value in metadata.items()})
    return model


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    atomic_write(path, model.SerializeToString())


def load_session(path_or_bytes: Path | str | bytes, *, threads: int = 1) -> tuple[Any, dict[str, str]]:
    """Open an onnxruntime CPU session on a file or serialized bytes; return it and its metadata.

    ``threads`` sets intra-op threads (0 = onnxruntime's default). Errors from onnxruntime (a
    missing or corrupt model) propagate as raised by onnxruntime.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session, dict(session.get_modelmeta().custom_metadata_map)


def check_parity(readout: Readout, session: Any, X_probe: np.ndarray, tol: float = 1e-4) -> ParityResult:
    """Compare ``session``'s probabilities and unknown scores with the readout's on ``X_probe`` ``(n, d)``.

    The unknown score (``learner.unknown.max_probability`` of the readout's probabilities) is checked
    when the graph has that output (every graph ``readout_to_onnx`` builds does). Fails (never
    raises) if the session cannot run the probe, the shapes differ, any output is
    non-finite, or the largest absolute difference exceeds ``tol``. An empty probe passes.
    """
    X = np.ascontiguousarray(X_probe, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0:
        return ParityResult(X.ndim == 2, 0.0, "" if X.ndim == 2 else f"probe must be 2-d, got {X.ndim}-d")
    try:
        scored = UNKNOWN_SCORE_NAME in {o.name for o in session.get_outputs()}
        outputs = session.run([OUTPUT_NAME, UNKNOWN_SCORE_NAME] if scored else [OUTPUT_NAME], {INPUT_NAME: X})
        want = readout.predict_proba(X)
        got = outputs[0] if not scored else np.concatenate([outputs[0], outputs[1][:, None]], axis=1)
        if scored:  # the score rides along as one more column: one comparison covers both
            want = np.concatenate([want, want.max(axis=1, keepdims=True)], axis=1)
    except Exception as exc:  # onnxruntime raises its own types; the gate reports, not raises
        return ParityResult(False, math.inf, f"probe failed: {type(exc).__name__}: {exc}")
    if got.shape != want.shape:
        return ParityResult(False, math.inf, f"output shape {got.shape}, expected {want.shape}")
    if not np.isfinite(got).all():
        return ParityResult(False, math.inf, "ONNX output has NaN or Inf")
    if not np.isfinite(want).all():
        return ParityResult(False, math.inf, "readout output has NaN or Inf")
    diff = float(np.abs(got.astype(np.float64) - want).max())
    if diff > tol:
        return ParityResult(False, diff, f"max abs diff {diff:.3g} > {tol:.3g}")
    return ParityResult(True, diff, "")


def _check_readout(readout: Readout) -> tuple[int, int]:
    """Return ``(d, k)`` after checking that the readout's shapes fit together."""
    weight, bias = np.asarray(readout.weight), np.asarray(readout.bias)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-d (p, k), got shape {weight.shape}")
    p, k = weight.shape
    if k == 0 or len(readout.classes) != k:
        raise ValueError(f"weight has {k} columns for {len(readout.classes)} classes (need >= 1, equal)")
    if bias.shape != (k,):
        raise ValueError(f"bias has shape {bias.shape}, expected ({k},)")
    t = float(readout.temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be positive and finite, got {t}")
    if readout.projection is None:
        return p, k
    projection = np.asarray(readout.projection)
    if projection.ndim != 2 or projection.shape[0] != p:
        raise ValueError(f"projection has shape {projection.shape}, expected ({p}, d) to match weight")
    return projection.shape[1], k


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


