"""Work handed to the learner thread from other threads (admin RPCs), run between batches."""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class TaskQueue:
    """Functions submitted from any thread, run in order by the owner thread's ``run_pending``.

    The learner state has one owner: anything else that must read or change it (forget, export
    now, rollback's pause) goes through here and waits on the returned future.
    """

    def __init__(self, before_each: Callable[[], None] = lambda: None) -> None:
        self._before_each = before_each  # e.g. let the head's update in flight land first
        self._tasks: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Queue ``fn``; its future holds the result, or the exception it raised."""
        future: Future[Any] = Future()
        self._tasks.put((fn, future))
        return future

    def run_pending(self) -> None:
        """Run every queued function now, on the calling thread."""
        while not self._tasks.empty():
            self._before_each()
            fn, future = self._tasks.get_nowait()
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
