"""Temperature scaling: one scalar that makes a head's probabilities honest.

Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017). Every head serves
``softmax(scores / T)`` where ``scores = readout.scores(X)`` are its raw linear scores. Scaling by
``T`` never changes the argmax, only how confident the probabilities are. Heads start with a
documented default ``T`` (ncm 0.05, slda 8.0, ridge 0.05); the service may fit ``T`` on held-out
labelled events and install it with ``head.set_temperature(T)``::

    readout = head.readout()
    idx, known = class_indices(y_held, readout.classes)    # drop labels the head has not seen
    head.set_temperature(fit_temperature(readout.scores(X_held[known]), idx[known]))

The negative log-likelihood is convex in ``1/T``, so a bounded scalar search on ``log T`` finds
the global minimum within the bounds.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
from scipy.special import logsumexp

T_MIN, T_MAX = 1e-4, 1e4


def nll(scores: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(scores / temperature)`` at integer labels ``y``."""
    Z = np.asarray(scores, dtype=np.float64) / temperature
    return float(np.mean(logsumexp(Z, axis=1) - Z[np.arange(len(Z)), y]))


def fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The ``T`` in ``[1e-4, 1e4]`` minimising held-out NLL of ``softmax(scores / T)``.

    ``scores``: finite (n, k) raw scores, n >= 1, k >= 1; ``y``: (n,) integer column indices in
    ``[0, k)``. Raises ``ValueError`` otherwise. Separable data with correct predictions drive
    ``T`` to the lower bound (NLL falls as confidence grows); that is the honest answer.
    """
    S = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(y)
    if S.ndim != 2 or S.shape[0] < 1 or S.shape[1] < 1:
        raise ValueError(f"scores must have shape (n >= 1, k >= 1), got {S.shape}")
    if labels.shape != (S.shape[0],):
        raise ValueError(f"y must have shape ({S.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= S.shape[1]:
        raise ValueError(f"y must hold integer class indices in [0, {S.shape[1]})")
    if not np.isfinite(S).all():
        raise ValueError("scores must be finite")
    res = scipy.optimize.minimize_scalar(lambda t: nll(S, labels, float(np.exp(t))),
                                         bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                                         options={"xatol": 1e-5})
    return float(np.exp(res.x))


def class_indices(labels: list[str], classes: tuple[str, ...] | list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Column index of each label in ``classes``, and a mask of the labels that have one."""
    index = {c: i for i, c in enumerate(classes)}
    codes = np.array([index.get(label, -1) for label in labels], dtype=np.int64)
    return np.maximum(codes, 0), codes >= 0
