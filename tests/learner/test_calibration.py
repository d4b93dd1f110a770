"""Temperature scaling finds the NLL-optimal temperature and rejects malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from learner.calibration import class_indices, fit_temperature, nll
from learner.heads import make_head


def sampled_from_tempered_softmax(T: float, n: int = 4000, k: int = 5,
                                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels drawn from softmax(scores / T): the true temperature is T."""
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(n, k))
    P = np.exp(S / T)
    P /= P.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in P])
    return S, y


@pytest.mark.parametrize("T", [0.3, 1.0, 4.0])
def test_recovers_the_generating_temperature(T: float) -> None:
    S, y = sampled_from_tempered_softmax(T)
    fitted = fit_temperature(S, y)
    assert fitted == pytest.approx(T, rel=0.15)
    grid = np.exp(np.linspace(np.log(fitted) - 1, np.log(fitted) + 1, 41))
    assert nll(S, y, fitted) <= min(nll(S, y, t) for t in grid) + 1e-9


def test_fitted_temperature_improves_a_heads_held_out_nll() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=0.6, size=(4, 16))
    codes = rng.integers(0, 4, 800)
    X = centres[codes] + rng.normal(size=(800, 16))
    labels = [f"c{c}" for c in codes]
    head = make_head("ncm")
    head.learn_many(X[:400], labels[:400])
    readout = head.readout()
    idx, known = class_indices(labels[400:600], readout.classes)
    assert known.all()
    T = fit_temperature(readout.scores(X[400:600]), idx)
    test_idx, _ = class_indices(labels[600:], readout.classes)
    before = nll(readout.scores(X[600:]), test_idx, readout.temperature)
    head.set_temperature(T)
    assert head.readout().temperature == T
    assert nll(readout.scores(X[600:]), test_idx, T) < before


def test_class_indices_marks_unknown_labels() -> None:
    idx, known = class_indices(["b", "zz", "a"], ("a", "b"))
    assert idx.tolist()[::2] == [1, 0] and known.tolist() == [True, False, True]


@pytest.mark.parametrize("scores,y", [
    (np.zeros((3,)), np.zeros(3, int)),
    (np.zeros((0, 2)), np.zeros(0, int)),
    (np.zeros((3, 2)), np.zeros(2, int)),
    (np.zeros((3, 2)), np.array([0, 1, 2])),
    (np.zeros((3, 2)), np.array([0.0, 1.0, 1.0])),
    (np.full((3, 2), np.inf), np.zeros(3, int)),
])
def test_rejects_malformed_input(scores: np.ndarray, y: np.ndarray) -> None:
    with pytest.raises(ValueError):
        fit_temperature(scores, y)
