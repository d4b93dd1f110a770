"""What both prediction APIs share: limits, request errors, the served-model lookup, metrics.

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
    """Per-request limits, from ``serving`` settings."""

    max_batch: int
    max_text_chars: int


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
        self.coalescer = TextCoalescer(limits.max_batch) if coalesce_texts else None
        # Measured (bench/grpc_latency.py): a head run costs ~0.1 ms, less than a hop to a thread
        # pool and back, so feature rows are scored on the event loop; text embedding is not.
        self.features_inline = features_inline

    def model(self, pinned: int | None = None) -> ServedModel:
        """The served model; UNAVAILABLE before the first, NOT_FOUND if ``pinned`` is not it."""
        model = self.slot.get()
        if model is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, NO_MODEL)
        if pinned is not None and pinned != model.version:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model version {pinned} is not served; current is {model.version}")
        return model

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
            if self.features_inline:
                return Scored(*model.predict_scored(X), X)
            return Scored(*await asyncio.get_running_loop().run_in_executor(None, model.predict_scored, X), X)
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
        loop = asyncio.get_running_loop()
        try:
            if self.coalescer is None:
                X = await loop.run_in_executor(None, model.backbone.embed, list(texts))
            else:
                X = await self.coalescer.embed(model.backbone, texts)
            if self.features_inline:
                return Scored(*model.predict_scored(X), X)
            return Scored(*await loop.run_in_executor(None, model.predict_scored, X), X)
        except BackboneUnavailable as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except (ValueError, ModelError) as exc:
            raise invalid(str(exc)) from None

    def _check_batch(self, n: int) -> None:
        if n == 0:
            raise invalid("empty batch: send at least one input")
        if n > self.limits.max_batch:
            raise invalid(f"batch of {n} inputs; at most {self.limits.max_batch} are accepted")


def top_k_arg(model: ServedModel, k: int) -> int:
    """``k`` as asked (0 means 1), clamped to the classes known now; negative is INVALID_ARGUMENT.

    Clamped rather than refused because classes appear while clients run: asking for 5 of 3 is
    answered with 3.
    """
    if k < 0:
        raise invalid(f"top_k must be >= 0 (0 means 1), got {k}")
    return min(max(k, 1), len(model.classes))


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
