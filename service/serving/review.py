"""The review queue: predictions a person should label, published off the request path.

A prediction is offered when it was rejected as unknown or its margin (top probability minus the
second) is below ``margin``. ``offer`` runs on the request path and never blocks: it drops inputs
seen recently (de-duplication by a hash of the text or feature bytes), drops beyond
``max_per_second`` (a token bucket, burst of one second's worth), and puts what is left on a bounded
queue (dropping, and counting, when it is full). One background thread builds each record and hands
it to the ``ReviewSink`` (the daemon injects a Kafka producer for ``<topic>.review``; serving never
imports Kafka). A record, as JSON::

    {"id": "r-<sha256 of the input, 16 hex>", "text": "..." | "features": [...],
     "model_version": 7, "score": 0.41, "threshold": 0.63, "unknown": true,
     "reason": "unknown" | "low_margin", "top": [{"label": ..., "probability": ...}, ...], "ts": ...}

Label one and produce it back to the events topic as an ordinary event (README: "Review queue").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.metrics import REVIEW_RECORDS
from service.models.served import ServedModel

log = logging.getLogger(__name__)

TOP_LABELS = 3


class ReviewSink(Protocol):
    """Where review records go (called from the review thread only; may block briefly)."""

    def publish(self, key: str, record: dict[str, Any]) -> None:
        """Send one record; raising counts it as failed."""


@dataclass(frozen=True)
class ReviewOptions:
    """Plain settings of ``serving.review``."""

    max_per_second: float = 5.0
    margin: float = 0.1
    dedupe_window: int = 10_000
    queue_size: int = 1_000


@dataclass(frozen=True)
class _Item:
    key: str
    input: str | np.ndarray
    model: ServedModel
    probs: np.ndarray
    score: float
    unknown: bool
    at: float


class ReviewQueue:
    """Rate-limited, de-duplicated, bounded hand-off of doubtful predictions to a ``ReviewSink``."""

    def __init__(self, sink: ReviewSink, options: ReviewOptions) -> None:
        self.sink = sink
        self.options = options
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=options.queue_size)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._tokens = max(options.max_per_second, 1.0)
        self._refilled = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="eddy-review", daemon=True)
        self._thread.start()

    # -- request path --------------------------------------------------------------------------
    def offer(self, model: ServedModel, inputs: Sequence[str] | np.ndarray, probs: np.ndarray,
              score: np.ndarray, unknown: np.ndarray) -> None:
        """Queue the rejected and low-margin rows of a batch; never blocks, never raises for them."""
        doubtful = np.asarray(unknown, dtype=bool) | (_margins(probs) < self.options.margin)
        for i in np.flatnonzero(doubtful).tolist():
            value = inputs[i]
            key = _key(value)
            with self._lock:
                if key in self._seen:
                    self._seen.move_to_end(key)
                    REVIEW_RECORDS.labels(result="duplicate").inc()
                    continue
                if not self._take_token():
                    REVIEW_RECORDS.labels(result="rate_limited").inc()
                    continue
                self._remember(key)
            row = value if isinstance(value, str) else np.array(value, dtype=np.float32)
            item = _Item(key, row, model, probs[i], float(score[i]), bool(unknown[i]), time.time())
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                REVIEW_RECORDS.labels(result="dropped").inc()

    def _take_token(self) -> bool:
        now = time.monotonic()
        rate = self.options.max_per_second
        self._tokens = min(max(rate, 1.0), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        while len(self._seen) > self.options.dedupe_window:
            self._seen.popitem(last=False)

    # -- review thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.sink.publish(item.key, record(item))
                REVIEW_RECORDS.labels(result="published").inc()
            except Exception as exc:  # a broker outage must not end the thread
                REVIEW_RECORDS.labels(result="failed").inc()
                log.warning("review record %s not published: %s", item.key, exc)

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued (up to ``timeout`` seconds), then stop the thread."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)


def record(item: _Item) -> dict[str, Any]:
    """The JSON-ready review record of one queued prediction."""
    model = item.model
    order = np.argsort(-item.probs, kind="stable")[:TOP_LABELS]
    out: dict[str, Any] = {"id": item.key}
    if isinstance(item.input, str):
        out["text"] = item.input
    else:
        out["features"] = [float(v) for v in item.input]
    out.update(model_version=model.version, score=item.score, threshold=model.unknown_threshold,
               unknown=item.unknown, reason="unknown" if item.unknown else "low_margin",
               top=[{"label": model.classes[j], "probability": float(item.probs[j])} for j in order.tolist()],
               ts=round(item.at, 3))
    return out


def _margins(probs: np.ndarray) -> np.ndarray:
    """Top probability minus the second, per row (1.0 with a single class)."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top2 = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _key(value: str | np.ndarray) -> str:
    data = value.encode() if isinstance(value, str) else np.ascontiguousarray(value, dtype=np.float32).tobytes()
    return "r-" + hashlib.sha256(data).hexdigest()[:16]
