"""The streamed ridge head is the batch solution whatever the stream's order, GCV lambda included."""

import numpy as np

from learner.evaluate import stream_order
from learner.heads import make_head


def _learn(X: np.ndarray, y: np.ndarray, order: np.ndarray) -> np.ndarray:
    head = make_head("ridge", lam="gcv", expansion_width=96, seed=3)
    for i in range(0, len(order), 37):
        rows = order[i : i + 37]
        head.learn_many(X[rows], [str(v) for v in y[rows]])
        if i % 370 == 0:
            head.choose_lambda()  # as the service does now and then, at different moments per order
    head.choose_lambda()
    W = head.weights()
    cols = np.argsort(head.classes_)
    return W[:, cols]


def test_final_weights_identical_for_class_incremental_random_and_given_orders():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 24))
    y = rng.integers(0, 12, size=1500)
    X = (centers[y] + 0.5 * rng.normal(size=(1500, 24))).astype(np.float32)
    labels = [str(v) for v in y]
    weights = [_learn(X, y, stream_order(labels, order, seed)) for order, seed in
               (("class-incremental", 0), ("class-incremental", 1), ("random", 2), ("given", 0))]
    for W in weights[1:]:
        rel = np.abs(W - weights[0]).max() / np.abs(weights[0]).max()
        assert rel <= 1e-9, rel
