"""EmbedAhead: the next batch's texts are embedded on a worker, with unchanged results and errors."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from service.errors import BackboneUnavailable
from service.roles.embed_ahead import EmbedAhead

DIM = 3


class Recorder:
    """A deterministic fake encoder that records each call's texts and thread."""

    def __init__(self, fail_on: str | None = None, unavailable: bool = False) -> None:
        self.calls: list[tuple[list[str], str]] = []
        self.fail_on = fail_on
        self.unavailable = unavailable

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append((list(texts), threading.current_thread().name))
        if self.unavailable and threading.current_thread().name.startswith("embed-ahead"):
            raise BackboneUnavailable("shutting down")
        if self.fail_on is not None and self.fail_on in texts:
            raise ValueError(f"cannot embed {self.fail_on!r}")
        return np.array([[len(t), t.count("a"), hash(t) % 7] for t in texts], dtype=np.float32)


def direct(texts: Sequence[str]) -> np.ndarray:
    return Recorder()(texts)


def test_queued_texts_are_embedded_on_the_worker_and_served_in_order() -> None:
    enc = Recorder()
    ahead = EmbedAhead(enc, DIM)
    try:
        ahead.queue_next(["b", "cc", "b"])
        np.testing.assert_array_equal(ahead(["a", "aa"]), direct(["a", "aa"]))  # now: nothing was ahead
        got = ahead(["cc", "b", "b"])  # the next batch, in another order, with a repeat
        np.testing.assert_array_equal(got, direct(["cc", "b", "b"]))
    finally:
        ahead.close()
    assert enc.calls[0] == (["a", "aa"], threading.current_thread().name)
    texts, thread = enc.calls[1]
    assert texts == ["b", "cc"] and thread.startswith("embed-ahead")  # each text once, off this thread
    assert len(enc.calls) == 2  # the second batch needed no embedding of its own


def test_texts_not_embedded_ahead_are_embedded_now() -> None:
    enc = Recorder()
    ahead = EmbedAhead(enc, DIM)
    try:
        ahead.queue_next(["x"])
        ahead(["a"])
        np.testing.assert_array_equal(ahead(["x", "new"]), direct(["x", "new"]))
        assert enc.calls[-1] == (["new"], threading.current_thread().name)
        assert ahead([]).shape == (0, DIM)
    finally:
        ahead.close()


def test_unavailable_backbone_on_the_worker_reaches_the_caller() -> None:
    enc = Recorder(unavailable=True)  # on the worker only
    ahead = EmbedAhead(enc, DIM)
    try:
        ahead.queue_next(["x"])
        ahead(["a"])
        with pytest.raises(BackboneUnavailable):
            ahead(["x"])
    finally:
        ahead.close()


def test_a_failure_on_the_worker_is_raised_by_the_callers_own_call() -> None:
    enc = Recorder(fail_on="bad")
    ahead = EmbedAhead(enc, DIM)
    try:
        ahead.queue_next(["ok", "bad"])
        ahead(["a"])
        with pytest.raises(ValueError, match="bad"):
            ahead(["ok", "bad"])  # learn_batch then retries text by text, isolating "bad"
        np.testing.assert_array_equal(ahead(["ok"]), direct(["ok"]))
    finally:
        ahead.close()


def test_a_wrong_shape_is_an_error_not_a_silent_truncation() -> None:
    ahead = EmbedAhead(lambda texts: np.zeros((len(texts) + 1, DIM)), DIM)
    try:
        with pytest.raises(ValueError, match="shape"):
            ahead(["a", "b"])
    finally:
        ahead.close()
    ahead.close()  # idempotent
