"""Coalesce concurrent text requests into one encoder call.

Each text request used to embed on its own executor thread: at concurrency 8, eight ONNX Runtime
runs of one short text each fought over two cores. Here one embedding runs at a time, and the
requests that arrive meanwhile are embedded together in the next call, so nothing waits when the
server is idle and the encoder batches exactly when there is a queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import BackboneUnavailable
from service.models.served import Backbone


@dataclass
class _Request:
    backbone: Backbone
    texts: list[str]
    done: asyncio.Future[np.ndarray]


class TextCoalescer:
    """``await embed(backbone, texts)`` -> float32 ``(len(texts), dim)``; lives on one event loop.

    Requests queued while an embedding runs go into the next call together (at most ``max_texts``
    texts per call, requests never split; requests for another backbone wait for their own call).
    If a combined call fails, each of its requests is embedded alone, so one bad text fails only
    its own request; ``BackboneUnavailable`` fails them all.
    """

    def __init__(self, max_texts: int) -> None:
        self.max_texts = max_texts
        self._queue: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None

    async def embed(self, backbone: Backbone, texts: Sequence[str]) -> np.ndarray:
        """The rows for ``texts``, embedded alone or together with concurrent requests."""
        request = _Request(backbone, list(texts), asyncio.get_running_loop().create_future())
        self._queue.append(request)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await request.done

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                live = [r for r in batch if not r.done.done()]  # a cancelled RPC needs no embedding
                if live:
                    await self._run(live)
        except BaseException as exc:  # never leave a request waiting forever
            for r in self._queue:
                _fail(r, exc if isinstance(exc, Exception) else RuntimeError("text embedding stopped"))
            self._queue = []
            raise

    def _take(self) -> list[_Request]:
        first = self._queue[0]
        batch: list[_Request] = []
        rest: list[_Request] = []
        total = 0
        for request in self._queue:
            fits = not batch or total + len(request.texts) <= self.max_texts
            if request.backbone is first.backbone and fits:
                batch.append(request)
                total += len(request.texts)
            else:
                rest.append(request)
        self._queue = rest
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        texts = [t for r in batch for t in r.texts]
        try:
            X = np.asarray(await loop.run_in_executor(None, batch[0].backbone.embed, texts), dtype=np.float32)
            if X.ndim != 2 or len(X) != len(texts):
                raise ValueError(f"backbone returned shape {X.shape} for {len(texts)} texts")
        except BackboneUnavailable as exc:
            for r in batch:
                _fail(r, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            for r in batch:  # find the request at fault; the others get their rows
                await self._run([r])
            return
        start = 0
        for r in batch:
            if not r.done.done():
                r.done.set_result(np.asarray(X[start:start + len(r.texts)]))
            start += len(r.texts)


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.done.done():
        request.done.set_exception(exc)
