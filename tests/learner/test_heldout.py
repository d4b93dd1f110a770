"""Leave-one-out scores of learned events equal the scores of a head that never learned them."""

from __future__ import annotations

import numpy as np
import pytest

from learner.calibration import nll
from learner.heads import make_head
from learner.heldout import fit_heldout_temperature, heldout_scores


def blobs(n: int, k: int = 4, d: int = 12, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, n)
    X = rng.normal(scale=0.8, size=(k, d))[codes] + rng.normal(size=(n, d))
    return X, [f"c{c}" for c in codes]


@pytest.mark.parametrize(("kind", "params"), [("ridge", {"lam": 0.7, "expansion_width": 32}),
                                              ("ridge", {"lam": 2.0, "expansion_width": 0}),
                                              ("ncm", {})])
def test_leave_one_out_equals_learning_without_the_event(kind: str, params: dict[str, object]) -> None:
    X, y = blobs(120)
    head = make_head(kind, **params)
    head.learn_many(X, y)
    scores, idx = heldout_scores(head, X[:5], y[:5])
    classes = head.readout().classes
    assert [classes[i] for i in idx] == y[:5]
    for i in range(5):
        without = make_head(kind, **params)
        without.learn_many(X, y)
        without.forget_many(X[i:i + 1], y[i:i + 1])  # exact: as if never learned
        assert without.readout().classes == classes
        np.testing.assert_allclose(scores[i], without.readout().scores(X[i:i + 1])[0], rtol=1e-4, atol=1e-4)


def test_unknown_labels_are_dropped_and_lengths_checked() -> None:
    X, y = blobs(60)
    head = make_head("ridge", lam=1.0, expansion_width=16)
    head.learn_many(X, y)
    scores, idx = heldout_scores(head, X[:4], ["c0", "never-seen", "c1", "c2"])
    assert scores.shape == (3, len(head.classes_)) and len(idx) == 3
    with pytest.raises(ValueError, match="got 2 labels for 4 rows"):
        heldout_scores(head, X[:4], ["c0", "c1"])
    assert fit_heldout_temperature(head, X[:2], ["x", "y"]) is None


def test_a_temperature_fitted_on_learned_events_is_not_overconfident() -> None:
    # Many features, few events: in-sample scores are near-perfect, so fitting on them drives T
    # down; the leave-one-out fit tracks the temperature that is best on fresh events.
    X, y = blobs(400, k=5, d=12, seed=1)
    fresh_X, fresh_y = blobs(2000, k=5, d=12, seed=1)
    fresh_X, fresh_y = fresh_X[400:], fresh_y[400:]  # same centres, events the head never saw
    head = make_head("ridge", lam=0.1, expansion_width=256)
    head.learn_many(X, y)
    readout = head.readout()
    from learner.calibration import class_indices, fit_temperature

    own, _ = class_indices(y, readout.classes)
    fresh, _ = class_indices(fresh_y, readout.classes)
    in_sample = fit_temperature(readout.scores(X), own)
    loo = fit_heldout_temperature(head, X, y)
    assert loo is not None and loo > in_sample
    S = readout.scores(fresh_X)
    assert nll(S, fresh, loo) < nll(S, fresh, in_sample)
