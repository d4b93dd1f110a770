"""Coalesce concurrent text requests into one encoder call, and slice big ones so small ones wait little.

Each text request used to embed on its own executor thread: at concurrency 8, eight ONNX Runtime
runs of one short text each fought over two cores. Here one embedding runs at a time, and the
requests that arrive meanwhile are embedded together in the next call, so nothing waits when the
server is idle and the encoder batches exactly when there is a queue.

A request bigger than one call's budget (``slice_chars``) is embedded in slices, and calls alternate
between the small requests waiting (whole, together) and the next slice of a big one: a batch of
1,024 long texts used to hold the encoder for ~40 s while single short texts timed out behind it
(issue 14); now a short text waits for at most one slice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.errors import BackboneUnavailable
from service.models.served import Backbone

TEXT_COST_CAP = 512  # characters a text counts for at most: about what a 128-token encoder reads
TEXT_COST_FIXED = 16  # per-text overhead, so a slice of empty strings is bounded too


def text_cost(text: str) -> int:
    """The encoder work of one text, in characters (capped: the encoder truncates)."""
    return min(len(text), TEXT_COST_CAP) + TEXT_COST_FIXED


@dataclass(eq=False)
class _Request:
    backbone: Backbone
    texts: list[str]
    done: asyncio.Future[np.ndarray]
    small: bool
    next: int = 0  # texts[:next] are handed to the encoder
    parts: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    stop: int


class TextCoalescer:
    """``await embed(backbone, texts)`` -> float32 ``(len(texts), dim)``; lives on one event loop.

    Requests queued while an embedding runs go into the next call together: small requests (whole,
    at most ``max_texts`` texts and ``slice_chars`` of ``text_cost`` per call; requests for another
    backbone wait for their own call) and, taking turns with them, slices of bigger requests (round
    robin). If a combined call fails, each of its requests is embedded alone, so one bad text fails
    only its own request; ``BackboneUnavailable`` fails them all.
    """

    def __init__(self, max_texts: int, slice_chars: int | None = None) -> None:
        self.max_texts = max_texts
        self.slice_chars = slice_chars
        self._queue: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None
        self._small_turn = True

    async def embed(self, backbone: Backbone, texts: Sequence[str]) -> np.ndarray:
        """The rows for ``texts``, embedded alone, together with concurrent requests, or in slices."""
        texts = list(texts)
        small = len(texts) <= self.max_texts and (
            self.slice_chars is None or sum(map(text_cost, texts)) <= self.slice_chars)
        request = _Request(backbone, texts, asyncio.get_running_loop().create_future(), small)
        self._queue.append(request)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await request.done

    async def _drain(self) -> None:
        try:
            while self._queue:
                self._queue = [r for r in self._queue if not r.done.done()]  # a cancelled RPC needs no embedding
                if self._queue:
                    await self._run(self._take())
        except BaseException as exc:  # never leave a request waiting forever
            for r in self._queue:
                _fail(r, exc if isinstance(exc, Exception) else RuntimeError("text embedding stopped"))
            self._queue = []
            raise

    def _take(self) -> list[_Slice]:
        backbone = self._queue[0].backbone
        mine = [r for r in self._queue if r.backbone is backbone]
        small = [r for r in mine if r.small]
        big = [r for r in mine if not r.small]
        if small and (self._small_turn or not big):
            self._small_turn = False
            return self._take_small(small)
        self._small_turn = True
        return [self._take_slice(big[0])]

    def _take_small(self, small: list[_Request]) -> list[_Slice]:
        batch: list[_Slice] = []
        texts = chars = 0
        for r in small:
            cost = sum(map(text_cost, r.texts)) if self.slice_chars is not None else 0
            fits = not batch or (texts + len(r.texts) <= self.max_texts
                                 and (self.slice_chars is None or chars + cost <= self.slice_chars))
            if fits:
                batch.append(_Slice(r, 0, len(r.texts)))
                texts, chars = texts + len(r.texts), chars + cost
                r.next = len(r.texts)
                self._queue.remove(r)
        return batch

    def _take_slice(self, r: _Request) -> _Slice:
        stop, chars = r.next, 0
        while stop < len(r.texts) and stop - r.next < self.max_texts:
            cost = text_cost(r.texts[stop])
            if stop > r.next and self.slice_chars is not None and chars + cost > self.slice_chars:
                break
            chars += cost
            stop += 1
        piece = _Slice(r, r.next, stop)
        r.next = stop
        self._queue.remove(r)
        if stop < len(r.texts):
            self._queue.append(r)  # round robin between big requests
        return piece

    async def _run(self, batch: list[_Slice]) -> None:
        loop = asyncio.get_running_loop()
        texts = [t for p in batch for t in p.request.texts[p.start:p.stop]]
        try:
            X = np.asarray(await loop.run_in_executor(None, batch[0].request.backbone.embed, texts),
                           dtype=np.float32)
            if X.ndim != 2 or len(X) != len(texts):
                raise ValueError(f"backbone returned shape {X.shape} for {len(texts)} texts")
        except BackboneUnavailable as exc:
            for p in batch:
                _fail(p.request, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0].request, exc)
                return
            for p in batch:  # find the request at fault; the others get their rows
                if not p.request.done.done():
                    await self._run([p])
            return
        start = 0
        for p in batch:
            r = p.request
            r.parts.append(X[start:start + p.stop - p.start])
            start += p.stop - p.start
            if p.stop == len(r.texts) and not r.done.done():
                r.done.set_result(r.parts[0] if len(r.parts) == 1 else np.concatenate(r.parts))


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.done.done():
        request.done.set_exception(exc)
