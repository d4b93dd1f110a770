"""Error-compensation memory: recent mistakes, used to correct predictions near them.

After ReLoop2 (Zhu et al., "ReLoop2: Building Self-Adaptive Recommendation Models via Responsive
Error Compensation Loop", KDD 2023): keep a small FIFO of recent errors, and at prediction time add
to the model's output an error estimate read from the stored errors closest to the input. Here an
error is (embedding, true label) of an event the head mispredicted, and the compensation moves the
probabilities towards the labels of the nearby mistakes:

    s_j   = cos(x, m_j)                       for the k nearest stored mistakes m_j
    w_j   = (s_j - tau) / (1 - tau)           kept only if s_j >= tau (so w_j in [0, 1])
    c     = sum_j w_j onehot(y_j) / sum_j w_j (over ``classes``; labels not in it are skipped)
    alpha = strength * max_j w_j
    p'    = p + alpha (c - p) = (1 - alpha) p + alpha c

``c - p`` is the estimated error of the prediction in that neighbourhood (ReLoop2's compensation
term), and ``p'`` stays a probability distribution. Rows with no mistake within ``tau`` are
returned unchanged. ``strength`` = 0 disables it; 1 lets an exact repeat of a mistake fully
override the head.

Pure numpy (brute-force cosine over at most ``capacity`` rows); no I/O; not thread-safe.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Defaults of the served compensation, chosen on a banking77 drift stream (bench/drift.py: tuning seed
# 1; on seed 0, ridge M=2048, prequential accuracy 0.841 -> 0.869, stationary half 0.863 -> 0.865).
# MiniLM neighbours within an intent have cosines of ~0.6-0.9, hence the threshold.
DEFAULT_CAPACITY = 2000
DEFAULT_K = 5
DEFAULT_STRENGTH = 1.0
DEFAULT_THRESHOLD = 0.6


class ErrorMemory:
    """A bounded FIFO of (L2-normalised embedding, true label) for recent mistakes."""

    def __init__(self, capacity: int, dim: int) -> None:
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity and dim must be >= 1, got capacity={capacity} dim={dim}")
        self.capacity, self.dim = capacity, dim
        self._X = np.zeros((capacity, dim), dtype=np.float32)
        self._labels: list[str] = [""] * capacity
        self._codes = np.zeros(capacity, dtype=np.int64)  # label of each row as an index into _names
        self._names: list[str] = []  # every label stored so far (classes: few), so adjust needs no per-row loop
        self._code_of: dict[str, int] = {}
        self._n = 0  # rows in use
        self._next = 0  # ring position of the next write

    def __len__(self) -> int:
        return self._n

    def add(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """Remember mistakes: rows ``X`` (n, dim) with their *true* labels; the oldest fall out."""
        X = _unit(self._check(X))
        if len(labels) != len(X):
            raise ValueError(f"got {len(labels)} labels for {len(X)} rows")
        for x, y in zip(X[-self.capacity :], list(labels)[-self.capacity :], strict=True):
            y = str(y)
            if y not in self._code_of:
                self._code_of[y] = len(self._names)
                self._names.append(y)
            self._X[self._next], self._labels[self._next] = x, y
            self._codes[self._next] = self._code_of[y]
            self._next = (self._next + 1) % self.capacity
            self._n = min(self._n + 1, self.capacity)

    def add_mistakes(self, X: np.ndarray, y_true: Sequence[str], y_pred: Sequence[str]) -> int:
        """Remember the rows where ``y_pred != y_true``; returns how many were stored."""
        if not len(y_true) == len(y_pred) == len(X):
            raise ValueError(f"got {len(X)} rows, {len(y_true)} true and {len(y_pred)} predicted labels")
        wrong = [i for i, (t, p) in enumerate(zip(y_true, y_pred, strict=True)) if t != p]
        if wrong:
            self.add(np.asarray(X)[wrong], [y_true[i] for i in wrong])
        return len(wrong)

    def discard(self, X: np.ndarray, labels: Sequence[str], *, min_cosine: float = 0.9999) -> int:
        """Remove stored mistakes that are these events (same label, cosine >= ``min_cosine``); returns how many.

        For forget requests: a re-embedded text may differ from its first embedding in the last
        bits, hence a cosine rather than an exact match.
        """
        Q = _unit(self._check(X))
        if len(labels) != len(Q):
            raise ValueError(f"got {len(labels)} labels for {len(Q)} rows")
        state = self.state_dict()
        if not len(Q) or not len(state["labels"]):
            return 0
        cos = state["vectors"] @ Q.T
        same = state["labels"][:, None] == np.asarray(list(labels), dtype=str)[None, :]
        return self._retain(state, ~((cos >= min_cosine) & same).any(axis=1))

    def remove_label(self, label: str) -> int:
        """Remove every stored mistake whose true label is ``label``; returns how many."""
        state = self.state_dict()
        return self._retain(state, state["labels"] != label)

    def _retain(self, state: dict[str, Any], keep: np.ndarray) -> int:
        removed = int((~keep).sum())
        if removed:
            self.load_state_dict({**state, "vectors": state["vectors"][keep], "labels": state["labels"][keep]})
        return removed

    def adjust(self, X: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, k: int = 5,
               strength: float = 0.5, threshold: float = 0.9) -> np.ndarray:
        """Compensated probabilities (formula in the module docstring); inputs are not modified.

        ``X`` (m, dim) queries, ``probs`` (m, len(classes)) rows summing to 1, ``classes`` the
        column labels. Returns float64 (m, len(classes)).
        """
        if not 0.0 <= strength <= 1.0 or not -1.0 <= threshold < 1.0 or k < 1:
            raise ValueError(f"need 0 <= strength <= 1, -1 <= threshold < 1, k >= 1; "
                             f"got strength={strength} threshold={threshold} k={k}")
        Q = _unit(self._check(X))
        P = np.array(probs, dtype=np.float64)
        if P.shape != (len(Q), len(classes)):
            raise ValueError(f"probs has shape {P.shape}, expected {(len(Q), len(classes))}")
        col = {c: i for i, c in enumerate(classes)}
        column_of_code = np.array([col.get(y, -1) for y in self._names], dtype=np.int64)
        known = column_of_code[self._codes[: self._n]] if self._n else np.zeros(0, dtype=np.int64)
        if self._n == 0 or not (known >= 0).any():
            return P
        # float32 product (no float64 copy of the whole memory per call: this runs per request)
        S = (Q @ self._X[: self._n].T).astype(np.float64)
        S[:, known < 0] = -np.inf  # the head cannot output those labels
        kk = min(k, self._n)
        nearest = np.argpartition(-S, kk - 1, axis=1)[:, :kk]
        sims = np.take_along_axis(S, nearest, axis=1)
        W = np.where(sims >= threshold, (sims - threshold) / (1.0 - threshold), 0.0)
        C = np.zeros_like(P)
        np.add.at(C, (np.repeat(np.arange(len(Q)), kk), known[nearest].ravel()), W.ravel())
        total = C.sum(axis=1, keepdims=True)
        hit = total[:, 0] > 0
        alpha = strength * W.max(axis=1, keepdims=True)
        P[hit] = (1.0 - alpha[hit]) * P[hit] + alpha[hit] * C[hit] / total[hit]
        return P

    def _check(self, X: np.ndarray) -> np.ndarray:
        A = np.asarray(X, dtype=np.float32)
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(f"expected shape (n, {self.dim}), got {A.shape}")
        if not np.isfinite(A).all():
            raise ValueError("embeddings must be finite (found NaN or Inf)")
        return A

    def state_dict(self) -> dict[str, Any]:
        """Rows oldest first and their labels (numpy arrays, no objects)."""
        order = (np.arange(self._n) + (self._next if self._n == self.capacity else 0)) % self.capacity
        return {"capacity": self.capacity, "dim": self.dim, "vectors": self._X[order].copy(),
                "labels": np.array([self._labels[i] for i in order], dtype=str)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` (keeps this memory's capacity; the newest rows win)."""
        if int(state["dim"]) != self.dim:
            raise ValueError(f"error memory state has dim {int(state['dim'])}, expected {self.dim}")
        self._n = self._next = 0
        self._labels = [""] * self.capacity
        self._names, self._code_of = [], {}
        X = np.asarray(state["vectors"], dtype=np.float32).reshape(-1, self.dim)
        if len(X):
            self.add(X, [str(v) for v in state["labels"]])


@dataclass(frozen=True)
class Compensator:
    """A frozen copy of an ``ErrorMemory`` and the settings to apply it: what a served model carries.

    Nothing mutates ``errors`` after ``freeze``, so any number of threads may call ``apply``.
    """

    errors: ErrorMemory
    k: int = DEFAULT_K
    strength: float = DEFAULT_STRENGTH
    threshold: float = DEFAULT_THRESHOLD

    @classmethod
    def freeze(cls, errors: ErrorMemory, **settings: Any) -> Compensator:
        """A compensator over a deep copy of ``errors`` (later mistakes do not reach it)."""
        return cls(copy.deepcopy(errors), **settings)

    def apply(self, X: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """``ErrorMemory.adjust`` with these settings, as float32 ``(m, len(classes))``."""
        adjusted = self.errors.adjust(X, probs, classes, k=self.k, strength=self.strength,
                                      threshold=self.threshold)
        return adjusted.astype(np.float32)


def _unit(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
