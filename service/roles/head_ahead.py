"""The head's update of batch k runs on a worker thread while the learner thread moves on to batch k+1.

With features the head's math is most of a batch's cost (ridge at M = 2,048: a (512 x 2,048)
expansion and its Gram update in float64), and BLAS releases the GIL. The rest of the learner's
work is Python that holds it: polling kafka-python, decoding, deduplicating, the replay memory and
the id window. Run one after the other they add up; with the update on its own thread they overlap
on two cores (issue 19, ``bench/learner_profile.py``)::

    learner thread:  poll k+1 | decode k+1 | memory k | window k | ...   (GIL, Python)
    head worker:     head.learn_many(k) ..........................      (BLAS, GIL released)

The order of updates is the order of batches (one worker, and each update waits for the one
before it), so the head's statistics are exactly those of a serial run. Whoever reads the head
(snapshots, exports, forgets, admin calls) calls ``settle()`` first: a snapshot then holds exactly
the events its offsets cover, as before.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from learner.heads.stats import ExactHead


class HeadAhead:
    """``HeadUpdates`` (see ``service.core.batch``) that apply each update on one worker thread, in order.

    ``start(head, X, labels)`` waits for the update in flight and starts ``head.learn_many(X,
    labels)`` on the worker. ``settle()`` waits for the update in flight; its exception is raised
    there, on the caller's thread (a crash: the batch's offsets are in the state already, so
    nothing may be snapshotted after it). ``X`` and ``labels`` must not change until settled (the
    head only reads them). Used from one thread (the learner's).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="head-update")
        self._inflight: Future[None] | None = None
        self._labels: list[str] = []  # of the update in flight

    def start(self, head: ExactHead, X: np.ndarray, labels: list[str]) -> None:
        """Start learning ``labels`` (rows ``X``) into ``head`` once the update in flight is done."""
        self.settle()
        self._labels = labels
        self._inflight = self._pool.submit(head.learn_many, X, labels)

    def settle(self) -> None:
        """Wait until every update started so far is in the head (raises the first one's failure)."""
        inflight, self._inflight = self._inflight, None
        self._labels = []
        if inflight is not None:
            inflight.result()

    def labels_in_flight(self) -> list[str]:
        """The labels of the update started and not yet settled (empty when none)."""
        return self._labels

    def close(self) -> None:
        """Wait for an update in flight, ignoring its failure (the caller is already failing), and stop."""
        self._pool.shutdown(wait=True)
        self._inflight = None
