"""Held-out scores of a head on events it has already learned, and a temperature fitted on them.

The replay memory holds events the head has learned, so their raw scores are optimistic: a
temperature fitted on them makes the served probabilities over-confident. For two heads the
leave-one-out scores are exact and cheap, so the memory can serve as a hold-out after all:

* ridge (the PRESS identity, Allen 1974): with ``h_i = phi_i^T (G + lam I)^-1 phi_i`` and ``y_i``
  the one-hot target, the head solved without event ``i`` scores it
  ``s_loo = (s - h_i y_i) / (1 - h_i)`` (all classes at once; exact for fixed ``lam``).
* ncm: the own class's mean without the event, ``(sum_c - x_i) / (n_c - 1)``; other classes are
  unchanged. An event that is its class's only one gets ``-1`` (the lowest cosine).
* slda: the own class's discriminant with that mean, ``x^T P mu' - mu'^T P mu' / 2`` for the
  shrunk shared precision ``P``; the covariance (``1/N`` of which is the event) and a class prior,
  if on, are not re-estimated. An event that is its class's only one gets its row's lowest score.

Other heads get their raw scores (documented optimism). Every function assumes each row was
learned exactly once by the head (true for memory items: the memory stores learned events and
forgetting removes from both); rows whose label the head does not know are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg

from learner.calibration import class_indices, fit_temperature
from learner.heads.base import Head, check_features
from learner.heads.ncm import NearestClassMeanHead
from learner.heads.ridge import RidgeHead
from learner.heads.slda import StreamingLDAHead


def heldout_scores(head: Head, X: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out raw scores ``(m, k)`` of the rows whose label the head knows, and their class indices.

    ``X`` (n, d) and ``labels`` (n strings) are events the head has learned. Columns follow
    ``head.readout().classes``. Raises ``ValueError`` for a wrong feature width or length mismatch.
    """
    if len(labels) != len(X):
        raise ValueError(f"got {len(labels)} labels for {len(X)} rows")
    readout = head.readout()
    X64 = check_features(X, head.n_features_in_)
    idx, known = class_indices(list(labels), readout.classes)
    X64, idx = X64[known], idx[known]
    scores = readout.scores(X64)
    if not len(idx):
        return scores, idx
    if isinstance(head, RidgeHead):
        return _ridge_loo(head, X64, idx, scores), idx
    if isinstance(head, NearestClassMeanHead):
        return _ncm_loo(head, X64, idx, scores), idx
    if isinstance(head, StreamingLDAHead):
        return _slda_loo(head, X64, idx, scores), idx
    return scores, idx


def _ridge_loo(head: RidgeHead, X: np.ndarray, idx: np.ndarray, scores: np.ndarray) -> np.ndarray:
    phi = head.features(X)
    A = head.gram()
    A[np.diag_indices_from(A)] += head.lambda_()
    factor = scipy.linalg.cho_factor(A, lower=False, overwrite_a=True, check_finite=False)
    h = np.einsum("ij,ji->i", phi, scipy.linalg.cho_solve(factor, phi.T, check_finite=False))
    h = np.minimum(h, 1.0 - 1e-6)  # h < 1 whenever lam > 0; guards rounding
    out = scores.copy()
    out[np.arange(len(idx)), idx] -= h
    return out / (1.0 - h)[:, None]


def _ncm_loo(head: NearestClassMeanHead, X: np.ndarray, idx: np.ndarray, scores: np.ndarray) -> np.ndarray:
    stats = head.statistics()  # sorted label order; map to the readout's column order
    row_of = {str(c): i for i, c in enumerate(stats["classes"])}
    order = [row_of[c] for c in head.readout().classes]
    sums, counts = stats["sums"][order][idx], stats["counts"][order][idx]
    out = scores.copy()
    rest = sums - X
    norms = np.linalg.norm(rest, axis=1) * np.linalg.norm(X, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ij,ij->i", rest, X) / norms
    out[np.arange(len(idx)), idx] = np.where((counts > 1) & (norms > 0), cos, -1.0)
    return out


def _slda_loo(head: StreamingLDAHead, X: np.ndarray, idx: np.ndarray, scores: np.ndarray) -> np.ndarray:
    stats = head.statistics()
    row_of = {str(c): i for i, c in enumerate(stats["classes"])}
    order = [row_of[c] for c in head.readout().classes]
    means = (stats["sums"] / stats["counts"][:, None])[order]
    n = stats["counts"][order][idx].astype(np.float64)
    d = means.shape[1]
    A = (1.0 - head.shrinkage) * head.covariance() + head.shrinkage * np.eye(d)
    factor = scipy.linalg.cho_factor(A, check_finite=False)
    Pmu = scipy.linalg.cho_solve(factor, means.T, check_finite=False)  # (d, k)
    Px = scipy.linalg.cho_solve(factor, X.T, check_finite=False)  # (d, m)
    rows = np.arange(len(idx))
    a = np.einsum("ij,ji->i", X, Pmu[:, idx])  # x^T P mu_c
    m = np.einsum("ij,ji->i", means[idx], Pmu[:, idx])  # mu_c^T P mu_c
    q = np.einsum("ij,ji->i", X, Px)  # x^T P x
    with np.errstate(divide="ignore", invalid="ignore"):
        loo = (n * a - q) / (n - 1) - 0.5 * (n * n * m - 2 * n * a + q) / (n - 1) ** 2
    out = scores.copy()
    own = out[rows, idx] - (a - 0.5 * m) + loo  # keeps a prior term in the bias, if any
    out[rows, idx] = np.where(n > 1, own, out.min(axis=1))
    return out


def fit_heldout_temperature(head: Head, X: np.ndarray, labels: Sequence[str]) -> float | None:
    """The NLL-optimal temperature on the leave-one-out scores of learned events (``None`` if no row is usable).

    Use it with ``head.set_temperature``; the argmax of the head never changes.
    """
    scores, idx = heldout_scores(head, X, labels)
    if not len(idx) or not np.isfinite(scores).all():
        return None
    return fit_temperature(scores, idx)
