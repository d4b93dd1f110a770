"""TextCoalescer: concurrent text requests share encoder calls; each still gets its own rows and errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from service.errors import BackboneUnavailable
from service.serving.grpc.coalesce import TextCoalescer
from tests.helpers import async_wait_for


class GatedBackbone:
    """Embeds a text as [len, first char code]; the first call waits for ``gate`` so others queue."""

    identity = "fake"
    dim = 2

    def __init__(self, bad: str | None = None, unavailable: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.bad = bad
        self.unavailable = unavailable

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.gate.wait(5)
        if self.unavailable:
            raise BackboneUnavailable("loading")
        if self.bad in texts:
            raise ValueError(f"cannot embed {self.bad!r}")
        return np.array([[len(t), ord(t[0])] for t in texts], dtype=np.float32)


def rows(texts: Sequence[str]) -> np.ndarray:
    return np.array([[len(t), ord(t[0])] for t in texts], dtype=np.float32)


async def _first_then_queue(backbone: GatedBackbone, coalescer: TextCoalescer,
                            queued: list[list[str]]) -> list[np.ndarray | BaseException]:
    """One request starts (and blocks in the encoder), the others arrive meanwhile, then it is released."""
    first = asyncio.ensure_future(coalescer.embed(backbone, ["warm"]))
    await async_wait_for(lambda: backbone.calls, message="the first call to reach the encoder")
    others = [asyncio.ensure_future(coalescer.embed(backbone, texts)) for texts in queued]
    await async_wait_for(lambda: len(coalescer._queue) == len(queued), message="the others to queue")
    backbone.gate.set()
    return await asyncio.gather(first, *others, return_exceptions=True)


def test_requests_that_arrive_during_a_call_share_the_next_one() -> None:
    backbone = GatedBackbone()
    queued = [["a", "bb"], ["ccc"], ["d", "ee", "f"]]
    results = asyncio.run(_first_then_queue(backbone, TextCoalescer(max_texts=64), queued))
    assert backbone.calls == [["warm"], ["a", "bb", "ccc", "d", "ee", "f"]]
    for got, texts in zip(results, [["warm"], *queued], strict=True):
        np.testing.assert_array_equal(got, rows(texts))


def test_calls_hold_at_most_max_texts_and_never_split_a_request() -> None:
    backbone = GatedBackbone()
    queued = [["a", "b"], ["c", "d"], ["e"], ["f", "g", "h"]]
    results = asyncio.run(_first_then_queue(backbone, TextCoalescer(max_texts=4), queued))
    assert backbone.calls == [["warm"], ["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    assert all(isinstance(r, np.ndarray) for r in results)


def test_a_bad_text_fails_only_its_own_request() -> None:
    backbone = GatedBackbone(bad="zz")
    queued = [["a"], ["ok", "zz"], ["c"]]
    _warm, a, bad, c = asyncio.run(_first_then_queue(backbone, TextCoalescer(max_texts=64), queued))
    np.testing.assert_array_equal(a, rows(["a"]))
    np.testing.assert_array_equal(c, rows(["c"]))
    assert isinstance(bad, ValueError) and "zz" in str(bad)


def test_an_unavailable_backbone_fails_every_request_in_the_call() -> None:
    backbone = GatedBackbone()

    async def run() -> list[np.ndarray | BaseException]:
        coalescer = TextCoalescer(max_texts=64)
        first = asyncio.ensure_future(coalescer.embed(backbone, ["warm"]))
        await async_wait_for(lambda: backbone.calls, message="the first call to reach the encoder")
        others = [asyncio.ensure_future(coalescer.embed(backbone, [t])) for t in "xyz"]
        await async_wait_for(lambda: len(coalescer._queue) == 3, message="the others to queue")
        backbone.unavailable = True
        backbone.gate.set()
        return await asyncio.gather(first, *others, return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, BackboneUnavailable) for r in results)
    assert len(backbone.calls) == 2  # not retried text by text


def test_a_cancelled_request_does_not_disturb_the_others() -> None:
    backbone = GatedBackbone()

    async def run() -> tuple[np.ndarray, np.ndarray]:
        coalescer = TextCoalescer(max_texts=64)
        first = asyncio.ensure_future(coalescer.embed(backbone, ["warm"]))
        await async_wait_for(lambda: backbone.calls, message="the first call to reach the encoder")
        gone = asyncio.ensure_future(coalescer.embed(backbone, ["gone"]))
        kept = asyncio.ensure_future(coalescer.embed(backbone, ["kept"]))
        await async_wait_for(lambda: len(coalescer._queue) == 2, message="both to queue")
        gone.cancel()  # the client's deadline passed
        backbone.gate.set()
        return await first, await kept

    _warm, kept = asyncio.run(run())
    np.testing.assert_array_equal(kept, rows(["kept"]))
    assert backbone.calls == [["warm"], ["kept"]]


@pytest.mark.parametrize("n", [1, 5])
def test_an_idle_coalescer_embeds_at_once(n: int) -> None:
    backbone = GatedBackbone()
    backbone.gate.set()
    texts = [f"t{i}" for i in range(n)]
    got = asyncio.run(TextCoalescer(max_texts=64).embed(backbone, texts))
    np.testing.assert_array_equal(got, rows(texts))
    assert backbone.calls == [texts]


def test_a_big_request_is_embedded_in_slices_taking_turns_with_small_ones() -> None:
    backbone = GatedBackbone()
    big = [f"b{i}" + "x" * 100 for i in range(10)]  # each costs 103 + 16 = 119 characters
    coalescer = TextCoalescer(max_texts=64, slice_chars=300)  # two big texts per slice
    results = asyncio.run(_first_then_queue(backbone, coalescer, [big, ["s1"], ["s2"]]))
    sliced = [call for call in backbone.calls if call[0].startswith("b")]
    assert [len(call) for call in sliced] == [2, 2, 2, 2, 2]
    # The small requests queued behind the big one are answered after its first slice, not its last.
    assert backbone.calls[1] == big[:2] and backbone.calls[2] == ["s1", "s2"]
    np.testing.assert_array_equal(results[1], rows(big))
    np.testing.assert_array_equal(results[2], rows(["s1"]))


def test_two_big_requests_share_the_encoder_round_robin() -> None:
    backbone = GatedBackbone()
    a, b = [f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)]
    results = asyncio.run(_first_then_queue(backbone, TextCoalescer(max_texts=2), [a, b]))
    assert backbone.calls[1:] == [a[0:2], b[0:2], a[2:4], b[2:4], a[4:6], b[4:6]]
    np.testing.assert_array_equal(results[1], rows(a))
    np.testing.assert_array_equal(results[2], rows(b))


def test_a_bad_text_in_a_big_request_fails_it_and_spares_the_others() -> None:
    backbone = GatedBackbone(bad="a3")
    a = [f"a{i}" for i in range(6)]
    _warm, got_a, got_s = asyncio.run(_first_then_queue(backbone, TextCoalescer(max_texts=2), [a, ["s"]]))
    assert isinstance(got_a, ValueError)
    np.testing.assert_array_equal(got_s, rows(["s"]))
    assert ["a4", "a5"] not in backbone.calls  # no work for a request that already failed
