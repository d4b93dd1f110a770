"""A snapshot taken under other head settings restores by rebuilding the head from its replay memory."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from memory import ReplayMemory
from memory.rebuild import rebuild_head
from service.core.restore import restore_state
from service.core.snapshots import pack, unpack
from service.core.state import LearnerState, new_state
from service.errors import CheckpointError

D = 6
OLD = {"lam": "gcv", "expansion_width": 32, "seed": 0, "temperature": "auto"}


def learned_state(memory_items: int | None = 60) -> LearnerState:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, 150)
    X = (rng.normal(size=(3, D))[codes] + 0.3 * rng.normal(size=(150, D))).astype(np.float32)
    labels = [f"c{c}" for c in codes]
    memory = None if memory_items is None else ReplayMemory(D, max_items=memory_items, use_gpu="never")
    state = new_state("ridge", OLD, memory, window=500, backbone_identity="bb")
    state.head.learn_many(X, labels)
    if memory is not None:
        memory.add(X, labels, [f"e{i}" for i in range(150)])
    state.offsets = {"t:0": 150}
    state.counters.learned = 150
    return state


def snapshot(state: LearnerState) -> dict[str, object]:
    return unpack(pack(state.state_dict()))  # the bytes a SnapshotStore writes and reads


def test_same_settings_restore_the_head_as_it_was() -> None:
    state = learned_state()
    fresh = new_state("ridge", OLD, ReplayMemory(D, max_items=60, use_gpu="never"), window=500,
                      backbone_identity="bb")
    assert restore_state(fresh, snapshot(state), "ridge", OLD) is False
    X = np.random.default_rng(1).normal(size=(4, D))
    np.testing.assert_array_equal(fresh.head.predict_proba_many(X)[0], state.head.predict_proba_many(X)[0])


@pytest.mark.parametrize(("kind", "params"), [("ridge", {**OLD, "expansion_width": 16}),
                                              ("ridge", {**OLD, "seed": 7}), ("ncm", {"temperature": "auto"})])
def test_changed_settings_rebuild_the_head_from_the_snapshots_memory(
        kind: str, params: dict[str, object], caplog: pytest.LogCaptureFixture) -> None:
    state = learned_state()
    with pytest.raises(ValueError):  # what the plain restore does with this snapshot
        new_state(kind, params, None, window=500, backbone_identity="bb").restore(snapshot(state))
    fresh = new_state(kind, params, ReplayMemory(D, max_items=60, use_gpu="never"), window=500,
                      backbone_identity="bb")
    with caplog.at_level(logging.WARNING, logger="service.core.restore"):
        assert restore_state(fresh, snapshot(state), kind, params) is True
    assert "60 items of the 150 events" in caplog.text
    assert sum(fresh.head.counts().values()) == 60  # exactly the memory's items
    assert fresh.memory is not None and len(fresh.memory) == 60
    assert fresh.offsets == {"t:0": 150} and fresh.counters.learned == 150  # nothing is replayed
    expected = rebuild_head(fresh.memory, kind, params)
    X = np.random.default_rng(2).normal(size=(5, D))
    np.testing.assert_allclose(fresh.head.predict_proba_many(X)[0], expected.predict_proba_many(X)[0])
    again = new_state(kind, params, ReplayMemory(D, max_items=60, use_gpu="never"), window=500,
                      backbone_identity="bb")
    assert restore_state(again, snapshot(fresh), kind, params) is False  # the rebuilt head snapshots as usual


def test_without_a_memory_the_mismatch_is_a_clear_error() -> None:
    state = learned_state(memory_items=None)
    fresh = new_state("ridge", {**OLD, "expansion_width": 16}, None, window=500, backbone_identity="bb")
    with pytest.raises(CheckpointError, match="no replay memory to rebuild it from"):
        restore_state(fresh, snapshot(state), "ridge", {**OLD, "expansion_width": 16})


def test_rebuild_head_learns_every_stored_item() -> None:
    memory = ReplayMemory(D, max_items=0, max_bytes=None, use_gpu="never")
    assert rebuild_head(memory, "ncm", {}).classes_ == []
    state = learned_state()
    assert state.memory is not None
    head = rebuild_head(state.memory, "slda", {})
    assert head.counts() == state.memory.counts()
    with pytest.raises(ValueError, match="unknown head kind"):
        rebuild_head(state.memory, "nope", {})
