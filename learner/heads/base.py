"""The one small interface every head implements, and the readout it exports.

A head learns from feature rows ``X`` (float32 or float64, shape ``(n, d)``) and string labels.
Classes appear when a label is first seen; ``classes_`` keeps first-seen order. Every head is a
sum of per-event statistics, so ``learn_many`` on chunks equals ``learn_many`` on everything, and
``forget_many`` subtracts exactly what ``learn_many`` added.

The served form of every head is a ``Readout``: probabilities are
``softmax((phi(x) @ weight + bias) / temperature)`` with
``phi(x) = relu(x @ projection.T)`` if a projection is set, else ``x / |x|`` if ``normalize``,
else ``x``. ``predict_proba_many`` must agree with that formula, which is what the ONNX export
runs and the parity gate checks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

StateDict = dict[str, Any]


@dataclass(frozen=True)
class Readout:
    """A solved head in closed linear form; what export turns into ONNX."""

    classes: tuple[str, ...]
    weight: np.ndarray  # float32 (p, k): p = projection rows, or input dim
    bias: np.ndarray  # float32 (k,)
    temperature: float
    projection: np.ndarray | None = None  # float32 (m, d) or None
    normalize: bool = False

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Reference numpy evaluation of the readout (float64 internally), shape ``(n, k)``."""
        return softmax(self.scores(X) / self.temperature)

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Raw scores before the temperature and softmax, shape ``(n, k)``."""
        Z = np.asarray(X, dtype=np.float64)
        if self.projection is not None:
            Z = np.maximum(Z @ self.projection.T.astype(np.float64), 0.0)
        elif self.normalize:
            Z = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
        return Z @ self.weight.astype(np.float64) + self.bias.astype(np.float64)


def softmax(S: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large scores."""
    S = S - S.max(axis=1, keepdims=True)
    E = np.exp(S)
    return E / E.sum(axis=1, keepdims=True)


def check_features(X: np.ndarray, n_features: int | None) -> np.ndarray:
    """Validate ``X`` as a 2-d finite array with ``n_features`` columns; return it as float64.

    Raises ``ValueError`` naming both numbers, e.g. ``got 383 features, expected 384``.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-d array of shape (n, d), got {X.ndim}-d")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"got {X.shape[1]} features, expected {n_features}")
    X64 = X.astype(np.float64, copy=False)
    if not np.isfinite(X64).all():
        raise ValueError("features must be finite (found NaN or Inf)")
    return X64


class Head(ABC):
    """A streaming head. Hyperparameters live in ``__init__``; learned state ends in ``_``."""

    kind: ClassVar[str]
    classes_: list[str]
    n_features_in_: int | None

    @abstractmethod
    def learn_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """Add the events' contributions. ``X`` is ``(n, d)``; ``labels`` has ``n`` strings."""

    @abstractmethod
    def forget_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """Remove exactly what ``learn_many(X, labels)`` added; a class with no events left disappears."""

    @abstractmethod
    def predict_proba_many(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Probabilities ``(n, k)`` over ``classes``; with no classes yet, ``(n, 0)`` and ``[]``."""

    @abstractmethod
    def state_dict(self) -> StateDict:
        """Everything needed to restore this head: numpy arrays, numbers, strings, lists of strings."""

    @abstractmethod
    def load_state_dict(self, state: StateDict) -> None:
        """Restore from ``state_dict()``; the result predicts identically."""

    @abstractmethod
    def readout(self) -> Readout:
        """The solved head in closed linear form (solves lazily if needed)."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Events currently learned per class."""
