"""What the prediction APIs share: limits, request errors, the served-model lookup, metrics.

OIP v2 over HTTP/REST (``service.serving.rest``) runs through the same OIP core, so everything here
applies to it too; it maps each status code to an HTTP status once, at its boundary.

Each servicer parses its own wire format into numpy rows or texts, then calls ``Predictor.run``,
which validates against the limits and the served model and returns probabilities. Every failure a
client can cause is a ``RequestError`` carrying the gRPC status code and a message saying what was
expected; ``rpc`` turns it into the status once, at the boundary, and counts every outcome.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import grpc
import numpy as np

from service.errors import BackboneUnavailable, ModelError
from service.metrics import PREDICT_SECONDS, REQUESTS
from service.models.served import ModelSlot, ServedModel
from service.serving.grpc.coalesce import TextCoalescer

log = logging.getLogger(__name__)

NO_MODEL = "no model is served yet: waiting for the first export"

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class RequestError(Exception):
    """A request eddy cannot answer; ``code`` is the gRPC status to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    """An INVALID_ARGUMENT error."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Limits:
    """Per-request limits, from ``serving`` settings (see ``config.toml`` for what each bounds)."""

    max_batch: int
    max_text_chars: int
    max_request_chars: int | None = None
    max_top_k: int | None = None
    max_response_bytes: int | None = None  # the gRPC send limit: bigger answers are refused unbuilt
    embed_slice_chars: int | None = None


# Below this many probabilities (rows x classes) scoring and building the answer take well under a
# millisecond and run on the event loop (a hop to a thread costs more); above it they run in the
# default executor, so one big request never stalls the others (issue 14: 29-115 s freezes).
INLINE_CELLS = 16_384
# Bytes one label/probability pair adds to an answer besides the label's UTF-8 bytes (protobuf
# tags, lengths, the float; OIP's 4-byte length prefix and float), and per row.
PAIR_OVERHEAD_BYTES = 12
ROW_OVERHEAD_BYTES = 8
MAX_LABEL_BYTES = 4 * 256  # events.MAX_LABEL_CHARS characters of UTF-8


def ranked(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the columns of the ``k`` highest probabilities (ties keep column order) and those.

    Equal to ``np.argsort(-probs, kind="stable")[:, :k]``; for ``k`` well below the class count it
    partitions first and sorts only the ``k`` chosen (rows where a tie straddles the cut fall back to
    the full sort, so the order is exactly the same).
    """
    if k == 1:
        order = probs.argmax(axis=1)[:, None]  # keeps the first of ties, as the stable sort does
    elif 4 * k < probs.shape[1]:
        part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(probs, part, axis=1)
        order = np.take_along_axis(part, np.lexsort((part, -values), axis=1), axis=1)
        cut = values.min(axis=1, keepdims=True)
        straddles = (probs == cut).sum(axis=1) > (values == cut).sum(axis=1)
        if straddles.any():
            order[straddles] = np.argsort(-probs[straddles], axis=1, kind="stable")[:, :k]
    else:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def check_answer_size(classes: Sequence[str], order: np.ndarray, limit: int | None) -> None:
    """Refuse (RESOURCE_EXHAUSTED) an answer naming ``classes[order]`` that would pass ``limit`` bytes.

    Checked before any message is built: building a 421 MB answer is what froze the server.
    """
    if limit is None or order.size * (MAX_LABEL_BYTES + PAIR_OVERHEAD_BYTES) + 1024 <= limit:
        return  # cannot be too big, whatever the labels
    label_bytes = np.fromiter((len(c.encode()) for c in classes), dtype=np.int64, count=len(classes))
    size = (int(label_bytes[order].sum()) + PAIR_OVERHEAD_BYTES * order.size
            + ROW_OVERHEAD_BYTES * len(order) + 1024)
    if size > limit:
        n, k = order.shape
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the answer ({n} inputs x {k} labels) would be about {size} bytes; at most "
                           f"{limit} are sent (serving.max_message_bytes): ask for fewer inputs or a "
                           f"smaller top_k")


class Scored(NamedTuple):
    """Probabilities ``(n, k)`` and unknown scores ``(n,)`` of a batch, and the feature rows scored."""

    probs: np.ndarray
    score: np.ndarray
    X: np.ndarray


@dataclass
class Timing:
    """Filled in by a handler so ``rpc`` can record prediction latency by input kind."""

    input: str | None = None


class Predictor:
    """Turns validated inputs into probabilities from the slot's current model."""

    def __init__(self, slot: ModelSlot, limits: Limits, *, features_inline: bool = True,
                 coalesce_texts: bool = True) -> None:
        self.slot = slot
        self.limits = limits
        self.coalescer = TextCoalescer(limits.max_batch, limits.embed_slice_chars) if coalesce_texts else None
        # Measured (bench/grpc_latency.py): a head run costs ~0.1 ms, less than a hop to a thread
        # pool and back, so feature rows are scored on the event loop; text embedding is not.
        self.features_inline = features_inline

    def model(self, pinned: int | None = None) -> ServedModel:
        """The served model, or loaded version ``pinned``.

        UNAVAILABLE before the first model; NOT_FOUND, listing the loaded versions, if ``pinned`` is
        not one of them.
        """
        model = self.slot.get()
        if model is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, NO_MODEL)
        if pinned is None or pinned == model.version:
            return model
        found = self.slot.find(pinned)
        if found is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, not_loaded(pinned, self.slot.loaded_versions()))
        return found

    async def features(self, model: ServedModel, X: np.ndarray) -> np.ndarray:
        """Probabilities for ``(n, d)`` rows (``scored_features`` without the scores)."""
        return (await self.scored_features(model, X)).probs

    async def texts(self, model: ServedModel, texts: Sequence[str]) -> np.ndarray:
        """Probabilities for texts (``scored_texts`` without the scores)."""
        return (await self.scored_texts(model, texts)).probs

    async def scored_features(self, model: ServedModel, X: np.ndarray) -> Scored:
        """Probabilities and unknown scores for ``(n, d)`` rows, scored inline or in the default executor."""
        self._check_batch(len(X))
        if X.ndim != 2 or X.shape[1] != model.n_features:
            width = X.shape[1] if X.ndim == 2 else X.size
            raise invalid(f"got {width} features, expected {model.n_features}")
        try:
            return await self._score(model, X)
        except ValueError as exc:
            raise invalid(str(exc)) from None

    async def scored_texts(self, model: ServedModel, texts: Sequence[str]) -> Scored:
        """Probabilities and unknown scores for texts, embedded off the event loop.

        Concurrent text requests share encoder calls (``service/serving/grpc/coalesce.py``) unless
        ``coalesce_texts`` is off.
        """
        self._check_batch(len(texts))
        if model.backbone is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"this server has no backbone, so it cannot embed text: "
                               f"send {model.n_features} features instead")
        for i, text in enumerate(texts):
            if len(text) > self.limits.max_text_chars:
                raise invalid(f"text {i} has {len(text)} characters; at most "
                              f"{self.limits.max_text_chars} are accepted")
        total, most = sum(map(len, texts)), self.limits.max_request_chars
        if most is not None and total > most:
            raise invalid(f"the request's texts have {total} characters in all; at most {most} are "
                          f"accepted per request (serving.max_request_chars): split the batch")
        loop = asyncio.get_running_loop()
        try:
            if self.coalescer is None:
                X = await loop.run_in_executor(None, model.backbone.embed, list(texts))
            else:
                X = await self.coalescer.embed(model.backbone, texts)
            return await self._score(model, X)
        except BackboneUnavailable as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except (ValueError, ModelError) as exc:
            raise invalid(str(exc)) from None

    async def _score(self, model: ServedModel, X: np.ndarray) -> Scored:
        if self.features_inline and len(X) * len(model.classes) <= INLINE_CELLS:
            return Scored(*model.predict_scored(X), X)
        return Scored(*await asyncio.get_running_loop().run_in_executor(None, model.predict_scored, X), X)

    async def answer(self, model: ServedModel, probs: np.ndarray, k: int,
                     build: Callable[[np.ndarray, np.ndarray], Resp]) -> Resp:
        """``build(order, top)`` over the top ``k`` of ``probs``, size-checked first, off the loop if big.

        ``order`` holds class indices ``(n, k)`` and ``top`` their probabilities, most probable
        first. Raises ``RequestError`` (RESOURCE_EXHAUSTED) before building an answer that could
        not be sent.
        """
        def work() -> Resp:
            order, top = ranked(probs, k)
            check_answer_size(model.classes, order, self.limits.max_response_bytes)
            return build(order, top)

        if probs.size <= INLINE_CELLS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(None, work)

    def top_k(self, model: ServedModel, k: int) -> int:
        """``top_k_arg`` under this server's ``max_top_k``."""
        return top_k_arg(model, k, self.limits.max_top_k)

    def _check_batch(self, n: int) -> None:
        if n == 0:
            raise invalid("empty batch: send at least one input")
        if n > self.limits.max_batch:
            raise invalid(f"batch of {n} inputs; at most {self.limits.max_batch} are accepted")


def not_loaded(version: object, loaded: list[int]) -> str:
    """Why ``version`` cannot answer: the message of a NOT_FOUND (HTTP 404) for it."""
    listed = ", ".join(str(v) for v in loaded) or "none yet"
    return f"model version {version} is not loaded; loaded versions (newest first): {listed}"


def top_k_arg(model: ServedModel, k: int, max_top_k: int | None = None) -> int:
    """``k`` as asked (0 means 1), clamped to the classes known now and to ``max_top_k``.

    Negative is INVALID_ARGUMENT. Clamped rather than refused because classes appear while clients
    run: asking for 5 of 3 is answered with 3; ``serving.max_top_k`` caps it the same way.
    """
    if k < 0:
        raise invalid(f"top_k must be >= 0 (0 means 1), got {k}")
    return min(max(k, 1), len(model.classes), max_top_k or len(model.classes))


def rpc(name: str) -> Callable[[Callable[[Any, Req, Any, Timing], Awaitable[Resp]]],
                               Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]]:
    """Decorate a unary handler ``(self, request, context, timing)``: count, time, translate errors."""

    def wrap(handler: Callable[[Any, Req, Any, Timing], Awaitable[Resp]]
             ) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
        @functools.wraps(handler)
        async def run(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            start = time.perf_counter()
            timing = Timing()
            code = grpc.StatusCode.OK
            try:
                response = await handler(self, request, context, timing)
            except RequestError as exc:
                code = exc.code
                await context.abort(exc.code, exc.message)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", name)
                await context.abort(code, f"{name} failed inside eddy; see the server log")
            finally:
                REQUESTS.labels(rpc=name, code=code.name).inc()
            if timing.input is not None:
                PREDICT_SECONDS.labels(rpc=name, input=timing.input).observe(time.perf_counter() - start)
            return response

        return run

    return wrap
