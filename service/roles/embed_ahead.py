"""Embed the next batch's texts while the learner works on the current one.

The learner thread alternates between the encoder (ONNX Runtime on every core) and its own work
on a batch: decoding, scoring it with the served model, the head's update, the replay memory.
While it does its own work the encoder's threads sat idle (~5% of a text stream's time). The
learn loop already holds the next batch (a poll is learned in batches), so its texts are sent to
a worker thread as soon as the current batch's embeddings are in hand.

Embedding is a pure function of the text, so this changes no result and no exactly-once
property: a text the learner asks for and the worker has not embedded is embedded directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from service.core.batch import Embed, checked_embeddings
from service.errors import BackboneUnavailable


class EmbedAhead:
    """An ``Embed`` (texts -> float32 ``(n, dim)``) that embeds queued texts ahead on one worker thread.

    Protocol, on one thread (the learner's): ``queue_next(texts)`` names the texts of the batch
    after the current one; the next call (the current batch's embedding) returns its rows, then
    starts embedding the queued texts; the call after that finds them ready. Errors keep their
    meaning: ``BackboneUnavailable`` from the worker is raised to the caller; any other failure
    there is forgotten and the texts are embedded again directly, so the caller sees the error
    from its own call (learn_batch then isolates the offending text).
    """

    def __init__(self, embed: Embed, dim: int) -> None:
        self._embed = embed
        self._dim = dim
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="embed-ahead")
        self._ahead: Future[dict[str, np.ndarray]] | None = None
        self._next: list[str] = []

    def queue_next(self, texts: Sequence[str]) -> None:
        """The texts to embed ahead once the current batch's embedding is done (replaces any queued)."""
        self._next = list(dict.fromkeys(texts))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Rows for ``texts`` in order (embedded ahead or now); then start on the queued texts."""
        ready = self._take_ready()
        missing = [t for t in dict.fromkeys(texts) if t not in ready]
        if missing:
            ready.update(zip(missing, self._checked(missing), strict=True))
        if self._next:
            self._ahead = self._pool.submit(self._rows, self._next)
            self._next = []
        if not len(texts):
            return np.zeros((0, self._dim), np.float32)
        return np.stack([ready[t] for t in texts])

    def close(self) -> None:
        """Wait for an embedding in flight (at most one batch) and stop the worker (idempotent)."""
        self._next = []
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _take_ready(self) -> dict[str, np.ndarray]:
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return {}
        try:
            return ahead.result()
        except BackboneUnavailable:
            raise
        except Exception:  # embedded again below, where the caller sees (and isolates) the error
            return {}

    def _rows(self, texts: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(texts, self._checked(texts), strict=True))

    def _checked(self, texts: list[str]) -> np.ndarray:
        return checked_embeddings(self._embed(texts), len(texts), self._dim)
