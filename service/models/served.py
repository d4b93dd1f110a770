"""The served model: one immutable object, and the slot that swaps it by reference.

A request reads ``slot.get()`` once and keeps that object until it answers, so a swap never
changes a model under a request and never blocks one: in-flight requests finish on the model they
started with, new ones see the new model. Versions in a slot only increase.

A head model is an ONNX file with input ``features`` float32 ``[N, d]`` and output
``probabilities`` float32 ``[N, k]`` (and, from eddy's exporter, ``unknown_score`` float32 ``[N]``:
the rejection score of ``learner.unknown``); its ``metadata_props`` hold ``classes`` (JSON list,
column order), ``model_version``, ``backbone_identity``, ``head_kind``, ``created_at``,
``source_offsets`` (JSON ``{"topic:partition": next_offset}``) and ``unknown_threshold`` (empty:
none chosen, nothing is rejected).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import numpy as np
import onnxruntime as ort

from memory.compensation import Compensator
from service.errors import ModelError
from service.metrics import LAST_SWAP_TIMESTAMP, MODEL_VERSION, SWAPS, UNKNOWN_THRESHOLD
from service.models.registry import ModelRegistry

log = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
UNKNOWN_SCORE_NAME = "unknown_score"


class Backbone(Protocol):
    """What the text path needs from a backbone (``learner.backbone.Backbone`` fits)."""

    @property
    def identity(self) -> str:
        """A string that changes whenever the embedding function changes."""

    @property
    def dim(self) -> int:
        """Width ``d`` of an embedding."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``(len(texts), dim)``."""


@dataclass(frozen=True, eq=False)
class ServedModel:
    """An exported head ready to answer, plus what clients are told about it. Never mutated."""

    version: int
    classes: tuple[str, ...]
    session: ort.InferenceSession
    meta: Mapping[str, str]
    n_features: int
    backbone: Backbone | None = None
    # Error compensation (memory.compensation) applied after the ONNX head; None: the head alone.
    compensation: Compensator | None = None

    @classmethod
    def from_session(cls, session: ort.InferenceSession, *, version: int, meta: Mapping[str, str],
                     backbone: Backbone | None = None, compensation: Compensator | None = None) -> ServedModel:
        """Wrap a built session; ``meta`` must hold ``classes`` (a JSON list). Runs one warm-up.

        Raises ``ModelError`` if the session's input/output names or widths disagree with ``meta``.
        """
        try:
            classes = tuple(json.loads(meta["classes"]))
        except (KeyError, TypeError, ValueError):
            raise ModelError("model metadata has no valid 'classes' JSON list") from None
        n_features = _input_width(session)
        model = cls(version=version, classes=classes, session=session,
                    meta=MappingProxyType(dict(meta)), n_features=n_features, backbone=backbone,
                    compensation=compensation)
        probs = model.predict_features(np.zeros((1, n_features), dtype=np.float32))  # warm-up
        if probs.shape != (1, len(classes)):
            raise ModelError(f"model outputs {probs.shape[1]} probabilities, "
                             f"but its metadata names {len(classes)} classes")
        return model

    # -- what clients are told ------------------------------------------------------------------
    @property
    def head_kind(self) -> str:
        """The head that produced this model (``ridge``, ``slda``, ``ncm``), or ``""``."""
        return self.meta.get("head_kind", "")

    @property
    def backbone_identity(self) -> str:
        """Identity of the backbone whose embeddings this head expects, or ``""``."""
        return self.meta.get("backbone_identity", "")

    @property
    def created_at(self) -> float:
        """Unix seconds when the model was exported (0.0 if unknown)."""
        try:
            return float(self.meta.get("created_at", "0"))
        except ValueError:
            return 0.0

    @property
    def source_offsets(self) -> dict[str, int]:
        """``{"topic:partition": next_offset}`` covered by this model (empty if unknown)."""
        try:
            return {str(k): int(v) for k, v in json.loads(self.meta.get("source_offsets", "{}")).items()}
        except (ValueError, AttributeError):
            return {}

    @property
    def unknown_threshold(self) -> float | None:
        """Inputs scoring below this are unknown (``learner.unknown``); None: reject nothing."""
        raw = self.meta.get("unknown_threshold", "")
        try:
            value = float(raw) if raw else None
        except ValueError:
            return None
        return value if value is not None and np.isfinite(value) else None

    # -- prediction -----------------------------------------------------------------------------
    def predict_scored(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(n, k)`` as ``predict_features``, and the unknown score ``(n,)`` of each row.

        The score is the ONNX head's own (before compensation), what the parity gate checked
        against the learner; a model exported before scores existed gets the same formula, the
        maximum of its raw probabilities. Same errors as ``predict_features``.
        """
        X = self._checked(X)
        if X.shape[0] == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32), np.zeros(0, dtype=np.float32)
        if self._has_score:
            raw, score = self.session.run([OUTPUT_NAME, UNKNOWN_SCORE_NAME], {INPUT_NAME: X})
        else:
            (raw,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: X})
            score = raw.max(axis=1)
        probs = np.asarray(raw, dtype=np.float32)
        if self.compensation is not None:
            probs = self.compensation.apply(X, probs, self.classes)
        return probs, np.asarray(score, dtype=np.float32)

    def rejects(self, score: np.ndarray) -> np.ndarray:
        """Boolean ``(n,)``: which scores fall below this model's unknown threshold (none without one)."""
        threshold = self.unknown_threshold
        score = np.asarray(score)
        return score < threshold if threshold is not None else np.zeros(score.shape, dtype=bool)

    @functools.cached_property
    def _has_score(self) -> bool:
        return UNKNOWN_SCORE_NAME in {o.name for o in self.session.get_outputs()}

    def _checked(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"expected a 2-d array of shape (n, {self.n_features}), got {X.ndim}-d")
        if X.shape[1] != self.n_features:
            raise ValueError(f"got {X.shape[1]} features, expected {self.n_features}")
        if X.shape[0] and not np.isfinite(X).all():
            raise ValueError("features must be finite (found NaN or Inf)")
        return X

    def predict_features(self, X: np.ndarray) -> np.ndarray:
        """Probabilities float32 ``(n, k)`` for feature rows ``X`` (``(n, d)``, any real dtype).

        The ONNX head's output, moved towards the labels of nearby recent mistakes when the model
        carries a ``compensation``. Raises ``ValueError`` for a wrong shape ("got 383 features,
        expected 384") or NaN/Inf.
        """
        probs = self.predict_raw(X)
        if self.compensation is None or not len(probs):
            return probs
        return self.compensation.apply(X, probs, self.classes)

    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        """The ONNX head's probabilities alone (no compensation); same contract as ``predict_features``."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"expected a 2-d array of shape (n, {self.n_features}), got {X.ndim}-d")
        if X.shape[1] != self.n_features:
            raise ValueError(f"got {X.shape[1]} features, expected {self.n_features}")
        if X.shape[0] == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        if not np.isfinite(X).all():
            raise ValueError("features must be finite (found NaN or Inf)")
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: X})[0]
        return np.asarray(out, dtype=np.float32)

    def predict_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` with the backbone, then ``predict_features``; ``(n, k)`` float32.

        Raises ``ModelError`` if this model was loaded without a backbone.
        """
        if self.backbone is None:
            raise ModelError(f"this server has no backbone, so it cannot embed text: "
                             f"send {self.n_features} features instead")
        return self.predict_features(self.backbone.embed(list(texts)))

    def top_k(self, probs: np.ndarray, k: int) -> list[tuple[list[str], list[float]]]:
        """Per row, the ``k`` most probable labels and their probabilities, most probable first.

        Ties keep column order. Raises ``ValueError`` unless ``1 <= k <= len(classes)``.
        """
        if not 1 <= k <= len(self.classes):
            raise ValueError(f"top_k must be between 1 and {len(self.classes)}, got {k}")
        # k == 1 is the common case: argmax keeps the first of ties, as the stable sort does.
        order = probs.argmax(axis=1)[:, None] if k == 1 else np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(probs, order, axis=1)
        return [([self.classes[j] for j in idx], [float(p) for p in row])
                for idx, row in zip(order.tolist(), top, strict=True)]


def make_session(model: bytes | Path, *, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model`` (bytes or a path), ``threads`` intra-op threads.

    Raises ``ModelError`` if onnxruntime cannot load the model.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        raise ModelError(f"onnxruntime cannot load the model: {exc}") from None


def compensation_bytes(compensation: Compensator) -> bytes:
    """The compensation as checksummed bytes (the registry's sidecar of a model version)."""
    from service.core.snapshots import pack

    return pack({"errors": compensation.errors.state_dict(), "k": compensation.k,
                 "strength": compensation.strength, "threshold": compensation.threshold})


def compensation_from_bytes(data: bytes) -> Compensator:
    """Inverse of ``compensation_bytes``; ``ModelError`` if the bytes are corrupt."""
    from memory.compensation import ErrorMemory
    from service.core.snapshots import unpack
    from service.errors import CheckpointError

    try:
        state = unpack(data)
        errors = ErrorMemory(int(state["errors"]["capacity"]), int(state["errors"]["dim"]))
        errors.load_state_dict(state["errors"])
    except (CheckpointError, KeyError, ValueError) as exc:
        raise ModelError(f"unreadable compensation sidecar: {exc}") from None
    return Compensator(errors, k=int(state["k"]), strength=float(state["strength"]),
                       threshold=float(state["threshold"]))


def load_registered(registry: ModelRegistry, version: int, backbone: Backbone | None, *,
                    threads: int = 1) -> ServedModel:
    """Registry ``version`` ready to serve, with the compensation published beside it (if any)."""
    model = load_served_model(registry.path(version), backbone, threads=threads, version=version)
    sidecar = registry.sidecar(version)
    return model if sidecar is None else replace(model, compensation=compensation_from_bytes(sidecar))


def load_served_model(path: Path, backbone: Backbone | None, *, threads: int = 1,
                      version: int | None = None) -> ServedModel:
    """Load an ONNX head from ``path``, warm it with one run, and return it ready to serve.

    ``version`` defaults to the file's ``model_version`` metadata. Raises ``ModelError`` if the file
    is missing or invalid, or if ``backbone`` is given but is not the one the model was built on.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model {path}: {exc.strerror}") from None
    session = make_session(data, threads=threads)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if version is None:
        try:
            version = int(meta["model_version"])
        except (KeyError, ValueError):
            raise ModelError(f"{path}: metadata has no integer 'model_version'") from None
    wanted = meta.get("backbone_identity")
    if backbone is not None and wanted and wanted != backbone.identity:
        raise ModelError(f"{path}: model was built on backbone {wanted!r}, "
                         f"but this server runs {backbone.identity!r}")
    return ServedModel.from_session(session, version=version, meta=meta, backbone=backbone)


def _input_width(session: ort.InferenceSession) -> int:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelError(f"model must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}; "
                         f"got inputs {sorted(inputs)} and outputs {sorted(outputs)}")
    shape = inputs[INPUT_NAME].shape
    if len(shape) != 2 or not isinstance(shape[1], int):
        raise ModelError(f"model input {INPUT_NAME!r} must have shape [N, d] with a fixed d, got {shape}")
    return shape[1]


class ModelSlot:
    """Holds the served model; ``get`` is a plain attribute read, ``swap`` only moves forward.

    The newest ``versions_loaded`` models stay loaded so a request may pin one of them
    (``find``); older ones are dropped at the swap that pushes them out, which releases their
    ONNX Runtime sessions. They share the backbone object, so each costs only its head.
    """

    def __init__(self, versions_loaded: int = 3) -> None:
        if versions_loaded < 1:
            raise ValueError(f"versions_loaded must be at least 1, got {versions_loaded}")
        self.versions_loaded = versions_loaded
        self._model: ServedModel | None = None
        self._loaded: tuple[ServedModel, ...] = ()  # newest first, the current one included
        self._changed = threading.Condition()
        self._listeners: list[Callable[[ServedModel], None]] = []

    def get(self) -> ServedModel | None:
        """The current model, or ``None`` before the first swap. Keep the object for one request."""
        return self._model

    @property
    def version(self) -> int | None:
        """The current model's version, or ``None``."""
        model = self._model
        return model.version if model is not None else None

    def find(self, version: int) -> ServedModel | None:
        """The loaded model of ``version``, or ``None`` if it is not (or no longer) loaded."""
        for model in self._loaded:
            if model.version == version:
                return model
        return None

    def loaded_versions(self) -> list[int]:
        """Versions that ``find`` answers, newest first (empty before the first swap)."""
        return [model.version for model in self._loaded]

    def swap(self, model: ServedModel) -> bool:
        """Serve ``model`` from now on if its version is newer; return whether it was applied.

        A version not greater than the current one is refused (``False``) so versions never go
        backwards for clients. Listeners run after the swap, outside the lock.
        """
        with self._changed:
            current = self._model
            if current is not None and model.version <= current.version:
                SWAPS.labels(result="rejected", reason="stale_version").inc()
                log.warning("refused swap to version %d: version %d is already served",
                            model.version, current.version)
                return False
            self._model = model  # one reference assignment: readers see old or new, never half
            self._loaded = (model, *self._loaded)[:self.versions_loaded]
            self._changed.notify_all()
            listeners = list(self._listeners)
        MODEL_VERSION.set(model.version)
        UNKNOWN_THRESHOLD.set(model.unknown_threshold if model.unknown_threshold is not None else 0.0)
        SWAPS.labels(result="applied", reason="ok").inc()
        LAST_SWAP_TIMESTAMP.set(time.time())
        for listener in listeners:
            listener(model)
        return True

    def wait_for(self, version: int, timeout: float) -> ServedModel | None:
        """Block until a model with version >= ``version`` is served; it, or ``None`` on timeout."""
        with self._changed:
            self._changed.wait_for(lambda: (self.version or 0) >= version, timeout=timeout)
            model = self._model
        return model if model is not None and model.version >= version else None

    def add_listener(self, listener: Callable[[ServedModel], None]) -> None:
        """Call ``listener(model)`` after every applied swap (from the swapping thread)."""
        with self._changed:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[ServedModel], None]) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        with self._changed:
            if listener in self._listeners:
                self._listeners.remove(listener)


class RegistryFollower:
    """A thread that serves whatever the registry names current (for separate serving processes).

    Every ``interval`` seconds it reads the registry's current version; if it is newer than the
    slot's, it loads, warms and swaps it in. A model that fails to load is logged and retried on
    the next tick; the old one keeps serving. Either ``start()``/``stop()`` its own thread, or call
    ``run(stop_event)`` from a thread of yours.
    """

    def __init__(self, registry: ModelRegistry, slot: ModelSlot, backbone: Backbone | None,
                 interval: float, *, threads: int = 1) -> None:
        self.registry = registry
        self.slot = slot
        self.backbone = backbone
        self.interval = interval
        self.threads = threads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="eddy-registry-follower",
                                        daemon=True)
        self._failed: int | None = None

    def start(self) -> RegistryFollower:
        """Start following (the first check happens immediately)."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following and join the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def poll_once(self) -> bool:
        """Check the registry once; return whether a newer model was swapped in."""
        try:
            current = self.registry.current()
            if current is None or current <= (self.slot.version or 0):
                return False
            model = load_registered(self.registry, current, self.backbone, threads=self.threads)
        except ModelError as exc:
            if self._failed != hash(str(exc)):  # log each distinct failure once, not every tick
                log.error("cannot follow the model registry: %s", exc)
                self._failed = hash(str(exc))
            return False
        self._failed = None
        return self.slot.swap(model)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set (the first check happens immediately)."""
        while not stop.is_set():
            self.poll_once()
            stop.wait(self.interval)
