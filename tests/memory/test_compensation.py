"""Error-compensation memory: stored mistakes pull nearby predictions towards the true label."""

from __future__ import annotations

import numpy as np
import pytest

from memory import ErrorMemory

DIM = 16
CLASSES = ["a", "b", "c"]


def around(rng: np.random.Generator, centre: np.ndarray, n: int, noise: float) -> np.ndarray:
    X = centre + noise * rng.standard_normal((n, len(centre)))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def test_a_mispredicted_neighbourhood_moves_towards_the_true_label() -> None:
    rng = np.random.default_rng(0)
    bad, far = np.eye(DIM)[0], np.eye(DIM)[1]
    # The head says "a" everywhere; around `bad` the truth is "b".
    mem = ErrorMemory(capacity=50, dim=DIM)
    mistakes = around(rng, bad, 20, 0.05)
    assert mem.add_mistakes(mistakes, ["b"] * 20, ["a"] * 20) == 20
    assert mem.add_mistakes(mistakes[:3], ["a"] * 3, ["a"] * 3) == 0  # correct ones are not stored
    queries = np.concatenate([around(rng, bad, 30, 0.05), around(rng, far, 30, 0.05)])
    probs = np.tile([0.7, 0.2, 0.1], (60, 1))
    before = probs.copy()
    adjusted = mem.adjust(queries, probs, CLASSES, k=5, strength=0.8, threshold=0.9)
    assert np.array_equal(probs, before)  # input untouched
    assert np.allclose(adjusted.sum(axis=1), 1.0) and (adjusted >= 0).all()
    near, away = adjusted[:30], adjusted[30:]
    assert (near[:, 1] > 0.2 + 0.3).all()  # "b" gained a lot near the mistakes
    assert (near.argmax(axis=1) == 1).mean() > 0.9  # and the decision flips there
    assert np.array_equal(away, probs[30:])  # far from every mistake nothing changes
    # strength 0 and unknown labels are no-ops
    assert np.array_equal(mem.adjust(queries, probs, CLASSES, strength=0.0), probs)
    assert np.array_equal(mem.adjust(queries, probs[:, [0, 2]], ["a", "c"]), probs[:, [0, 2]])


def test_the_effect_grows_with_similarity() -> None:
    mem = ErrorMemory(capacity=10, dim=DIM)
    mem.add(np.eye(DIM, dtype=np.float32)[:1], ["c"])
    close = np.eye(DIM)[0] + 0.1 * np.eye(DIM)[1]
    closer = np.eye(DIM)[0] + 0.02 * np.eye(DIM)[1]
    out = mem.adjust(np.stack([close, closer]), np.tile([0.5, 0.5, 0.0], (2, 1)), CLASSES, threshold=0.9,
                     strength=1.0)
    assert 0 < out[0, 2] < out[1, 2] <= 1.0


def test_fifo_capacity_and_state_round_trip() -> None:
    rng = np.random.default_rng(1)
    mem = ErrorMemory(capacity=4, dim=DIM)
    X = around(rng, np.ones(DIM), 6, 1.0)
    mem.add(X, ["a", "b", "c", "a", "b", "c"])
    assert len(mem) == 4
    state = mem.state_dict()
    assert state["labels"].tolist() == ["c", "a", "b", "c"]  # oldest two fell out
    copy = ErrorMemory(capacity=4, dim=DIM)
    copy.load_state_dict(state)
    Q, P = around(rng, np.ones(DIM), 5, 1.0), np.full((5, 3), 1 / 3)
    assert np.array_equal(copy.adjust(Q, P, CLASSES, threshold=0.0), mem.adjust(Q, P, CLASSES, threshold=0.0))
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        mem.add(np.zeros((1, 3)), ["a"])
    with pytest.raises(ValueError, match="probs has shape"):
        mem.adjust(Q, P[:, :2], CLASSES)


def test_forgotten_events_and_labels_leave_the_memory() -> None:
    rng = np.random.default_rng(2)
    X = around(rng, np.eye(DIM)[0], 6, 0.5)
    mem = ErrorMemory(capacity=10, dim=DIM)
    mem.add(X, ["a", "b", "a", "c", "a", "b"])
    assert mem.discard(X[[0, 1]] * 3.0, ["a", "c"]) == 1  # same direction and label only: row 1 is "b"
    assert mem.state_dict()["labels"].tolist() == ["b", "a", "c", "a", "b"]
    assert mem.remove_label("b") == 2 and mem.remove_label("zzz") == 0
    assert mem.state_dict()["labels"].tolist() == ["a", "c", "a"]
    np.testing.assert_allclose(mem.state_dict()["vectors"], X[[2, 3, 4]], atol=1e-6)
    mem.add(X[:1], ["d"])  # still a FIFO afterwards
    assert len(mem) == 4 and mem.state_dict()["labels"].tolist()[-1] == "d"
