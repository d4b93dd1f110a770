"""Out-of-scope scores and the conformal threshold (learner.unknown, learner.evaluate_ood)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from learner.evaluate_ood import auroc, evaluate_ood
from learner.heads import make_head
from learner.unknown import conformal_threshold, heldout_msp, max_probability


def test_threshold_is_the_floor_n_plus_1_alpha_th_smallest_score() -> None:
    scores = np.arange(1.0, 100.0)  # n = 99: (n + 1) * 0.05 = 5 -> the 5th smallest
    assert conformal_threshold(scores[::-1], 0.05) == 5.0
    assert conformal_threshold(scores, 0.02) == 2.0
    assert conformal_threshold(scores[:48], 0.02) is None  # floor(49 * 0.02) = 0: no promise can be kept
    assert conformal_threshold(scores[:49], 0.02) == 1.0
    with pytest.raises(ValueError, match="reject_rate"):
        conformal_threshold(scores, 1.0)
    with pytest.raises(ValueError, match="finite"):
        conformal_threshold(np.array([1.0, np.nan]), 0.5)


def test_exchangeable_in_scope_inputs_are_rejected_at_most_at_the_promised_rate() -> None:
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(400):
        calibration, new = rng.beta(5, 1, size=300), rng.beta(5, 1, size=200)
        rates.append(np.mean(new < conformal_threshold(calibration, 0.02)))
    # Conformal: E[rate] = floor(301 * 0.02) / 301 = 6 / 301 <= 0.02
    assert np.mean(rates) == pytest.approx(6 / 301, abs=0.002)
    assert np.mean(rates) <= 0.02


def test_ridge_leave_one_out_msp_equals_refitting_without_the_row() -> None:
    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(loc=3 * np.eye(6)[i], size=(15, 6)) for i in range(3)])
    y = [f"c{i}" for i in range(3) for _ in range(15)]
    head = make_head("ridge", lam=2.0, expansion_width=24, temperature=0.7)
    head.learn_many(X, y)
    held = heldout_msp(head, X, y)
    for i in (0, 17, 44):
        without = make_head("ridge", lam=2.0, expansion_width=24, temperature=0.7)
        keep = [j for j in range(len(y)) if j != i]
        without.learn_many(X[keep], [y[j] for j in keep])
        P, _ = without.predict_proba_many(X[i:i + 1])
        assert held[i] == pytest.approx(max_probability(P)[0], abs=1e-6)


def test_auroc_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 5, size=40).astype(float), rng.integers(0, 4, size=30).astype(float)
    want = roc_auc_score(np.r_[np.ones(40), np.zeros(30)], np.r_[a, b])
    assert auroc(a, b) == pytest.approx(want)


@pytest.mark.parametrize("kind", ["ridge", "slda", "ncm"])
def test_evaluate_ood_rejects_far_rows_and_keeps_in_scope_ones(kind: str) -> None:
    rng = np.random.default_rng(3)
    def unit(A: np.ndarray) -> np.ndarray:  # sentence embeddings are unit vectors
        return A / np.linalg.norm(A, axis=1, keepdims=True)

    # Classes that overlap a little (an honest temperature, not one driven to its bound).
    X = np.concatenate([unit(np.eye(12)[i] + 0.3 * rng.normal(size=(120, 12))) for i in range(4)])
    y = np.array([f"c{i}" for i in range(4) for _ in range(120)], dtype=object)
    order = rng.permutation(len(y))
    X, y = X[order], y[order]
    ood = unit(np.eye(12)[8] + 0.3 * rng.normal(size=(100, 12)))  # a direction no class lives in
    params = {"expansion_width": 64} if kind == "ridge" else {}
    out = evaluate_ood(make_head(kind, **params), X[:400], y[:400].tolist(), X[400:], y[400:].tolist(), ood,
                       reject_rate=0.05, scores=("msp", "energy", "mahalanobis"))
    assert out["calibration_items"] == 400
    for name, m in out["scores"].items():
        assert m["threshold"] is not None, name
        assert m["ood_auroc"] > 0.9 and m["ood_recall"] > 0.3, (name, m)
        assert m["in_scope_reject_rate"] <= 0.2, (name, m)
        assert m["in_scope_accuracy_with_rejection"] <= out["in_scope_accuracy"]
    with pytest.raises(ValueError, match="unknown --ood-score"):
        evaluate_ood(make_head(kind, **params), X, y.tolist(), X, y.tolist(), ood, scores=("odin",))


def test_slda_leave_one_out_scores_use_the_class_mean_without_the_row() -> None:
    from learner.heldout import heldout_scores

    rng = np.random.default_rng(4)
    X = np.concatenate([rng.normal(loc=2 * np.eye(5)[i], size=(20, 5)) for i in range(3)])
    y = [f"c{i}" for i in range(3) for _ in range(20)]
    head = make_head("slda", shrinkage=0.1)
    head.learn_many(X, y)
    held, _ = heldout_scores(head, X, y)
    readout = head.readout()
    A = 0.9 * head.covariance() + 0.1 * np.eye(5)  # type: ignore[attr-defined]
    P = np.linalg.inv(A)
    for i in (0, 25, 59):
        c = readout.classes.index(y[i])
        keep = [j for j in range(len(y)) if j != i and y[j] == y[i]]
        mu = X[keep].mean(axis=0)
        want = X[i] @ P @ mu - 0.5 * mu @ P @ mu
        assert held[i, c] == pytest.approx(want, rel=1e-6, abs=1e-6)
        others = [j for j in range(3) if j != c]
        np.testing.assert_allclose(held[i, others], readout.scores(X[i:i + 1])[0, others], rtol=1e-5)
