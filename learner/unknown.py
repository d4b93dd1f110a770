"""Out-of-scope rejection: a score per prediction and a threshold chosen from in-scope data only.

The score is the tempered maximum softmax probability (MSP; Hendrycks & Gimpel, ICLR 2017) of the
served readout: ``max_c softmax(scores / T)_c``, computed inside the exported ONNX graph (output
``unknown_score``), so the learner and the served model agree to the parity tolerance. Low means
"none of my classes": an input is rejected as unknown when its score is below the threshold.

The threshold is split-conformal (Vovk et al. 2005; Angelopoulos & Bates 2021) on scores of
in-scope items the head had not learned when scored: the leave-one-out scores of replay-memory
items (``learner.heldout``), exactly the items the temperature is fitted on. For ``n`` such scores
and a user's ``reject_rate`` alpha, the threshold is the ``r``-th smallest score with
``r = floor((n + 1) * alpha)``; a new in-scope input exchangeable with them is then rejected with
probability ``r / (n + 1) <= alpha``. With fewer than ``1 / alpha - 1`` items no threshold keeps
that promise, so nothing is rejected (``None``). No out-of-scope example is needed.

Alternatives (for ``eddy eval --ood-score``): ``energy`` (the tempered log-sum-exp of the scores,
Liu et al., NeurIPS 2020) and ``mahalanobis`` (minus the smallest Mahalanobis distance to a class
mean under the shared covariance, Lee et al., NeurIPS 2018). bench/ood.py compares them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import logsumexp

from learner.heads.base import Head, softmax
from learner.heldout import heldout_scores

SCORES = ("msp", "energy", "mahalanobis")


def max_probability(probs: np.ndarray) -> np.ndarray:
    """The MSP score ``(n,)`` of probability rows ``(n, k)``; ``ValueError`` unless ``k >= 1``."""
    P = np.asarray(probs)
    if P.ndim != 2 or P.shape[1] == 0:
        raise ValueError(f"probabilities must have shape (n, k >= 1), got {P.shape}")
    return P.max(axis=1)


def conformal_threshold(scores: np.ndarray, reject_rate: float) -> float | None:
    """The score below which inputs are rejected, so that in-scope rejection is at most ``reject_rate``.

    ``scores``: held-out in-scope scores (any order, finite). Returns the ``floor((n+1)*alpha)``-th
    smallest score, or ``None`` (reject nothing) when that rank is 0. Raises ``ValueError`` for
    ``reject_rate`` outside ``[0, 1)`` or non-finite scores.
    """
    if not 0.0 <= reject_rate < 1.0:
        raise ValueError(f"reject_rate must be in [0, 1), got {reject_rate}")
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    rank = math.floor((len(s) + 1) * reject_rate + 1e-9)  # guard (n+1)*alpha landing just below an integer
    if rank < 1:
        return None
    return float(s[min(rank, len(s)) - 1])


def heldout_msp(head: Head, X: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """MSP scores ``(m,)`` of learned rows as if each had not been learned (leave-one-out).

    Uses the head's current temperature; rows whose label the head does not know are dropped.
    Exact for ridge and ncm; for slda the own class mean is left out (its shared covariance is not
    re-estimated: ``1/N`` of it); see ``learner.heldout``.
    """
    scores, idx = heldout_scores(head, X, labels)
    if not len(idx):
        return np.zeros(0)
    return softmax(scores / head.readout().temperature).max(axis=1)


def energy(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``T * logsumexp(scores / T)`` per row: higher means more in scope."""
    return temperature * logsumexp(np.asarray(scores, dtype=np.float64) / temperature, axis=1)


def mahalanobis(X: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Minus the smallest squared Mahalanobis distance of each row ``X`` (n, d) to ``means`` (k, d).

    ``precision`` (d, d) is the inverse shared covariance. Higher means more in scope.
    """
    return -squared_distances(X, means, precision).min(axis=1)


def squared_distances(X: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances ``(n, k)`` of rows ``X`` (n, d) to ``means`` (k, d)."""
    X = np.asarray(X, dtype=np.float64)
    XP = X @ precision
    quad_x = np.einsum("ij,ij->i", XP, X)
    quad_m = np.einsum("ij,ij->i", means @ precision, means)
    return np.maximum(quad_x[:, None] - 2.0 * XP @ means.T + quad_m[None, :], 0.0)


def class_gaussians(X: np.ndarray, labels: Sequence[str], shrinkage: float = 1e-3
                    ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Classes, their means (k, d) and the shrunk shared-covariance precision (d, d) of ``X``."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(labels, dtype=object)
    classes = sorted(set(y.tolist()))
    means = np.stack([X[y == c].mean(axis=0) for c in classes])
    centred = X - means[np.searchsorted(np.asarray(classes, dtype=object), y)]
    cov = centred.T @ centred / max(len(X) - len(classes), 1)
    cov = (1.0 - shrinkage) * cov + shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    return classes, means, np.linalg.inv(cov)
