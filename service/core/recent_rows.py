"""A fixed-size ring of the most recent learned rows: the parity probe and the quality-gate window."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class RecentRows:
    """The last ``capacity`` (feature row, label) pairs seen by the learner, oldest overwritten first."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.capacity = capacity
        self._X = np.zeros((capacity, dim), dtype=np.float32)
        self._labels: list[str] = [""] * capacity
        self._next = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def extend(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """Append rows; only the newest ``capacity`` are kept."""
        if self.capacity == 0:
            return
        for row, label in zip(X[-self.capacity :], list(labels)[-self.capacity :], strict=True):
            self._X[self._next] = row
            self._labels[self._next] = label
            self._next = (self._next + 1) % self.capacity
            self._size = min(self._size + 1, self.capacity)

    def discard(self, X: np.ndarray, labels: Sequence[str], *, label: str | None = None, tol: float = 1e-3) -> int:
        """Drop forgotten rows; return how many were dropped (the rest keep their order).

        Dropped: every row of ``label``, and for each row of ``X`` one stored row with the same label
        that equals it (bytes) or lies within L2 distance ``tol`` (a text event embedded again to be
        forgotten may differ in the last bits).
        """
        if self._size == 0:
            return 0
        order = [(self._next + i) % self.capacity for i in range(self._size)] if self._size == self.capacity \
            else list(range(self._size))
        stored = self._X[order]
        names = np.asarray([self._labels[i] for i in order], dtype=object)
        drop = names == label if label is not None else np.zeros(len(order), dtype=bool)
        exact: dict[tuple[str, bytes], list[int]] = {}
        for j in np.flatnonzero(~drop):
            exact.setdefault((names[j], stored[j].tobytes()), []).append(int(j))
        left: dict[str, list[int]] = {}
        for i, lab in enumerate(labels):
            hits = exact.get((lab, np.asarray(X[i], np.float32).tobytes()))
            if hits:
                drop[hits.pop()] = True
            else:
                left.setdefault(lab, []).append(i)
        for lab, rows in left.items():
            self._drop_nearest(stored, names == lab, X[rows], drop, tol)
        keep = np.flatnonzero(~drop)
        self._X[: len(keep)] = stored[keep]
        self._labels[: len(keep)] = [str(names[j]) for j in keep]
        self._size = len(keep)
        self._next = self._size % self.capacity
        return int(drop.sum())

    @staticmethod
    def _drop_nearest(stored: np.ndarray, same: np.ndarray, X: np.ndarray, drop: np.ndarray, tol: float) -> None:
        """Mark in ``drop`` the nearest not-yet-dropped ``same`` row of each row of ``X``, when within ``tol``."""
        for lo in range(0, len(X), 1024):
            cand = np.flatnonzero(same & ~drop)
            if not len(cand):
                return
            rows, pool = np.asarray(X[lo : lo + 1024], np.float32), stored[cand]
            d2 = (rows**2).sum(1)[:, None] + (pool**2).sum(1)[None, :] - 2 * rows @ pool.T
            nearest = d2.argmin(1)
            for r, j in enumerate(nearest):
                if d2[r, j] <= tol * tol and not drop[cand[j]]:
                    drop[cand[j]] = True

    def rows(self) -> tuple[np.ndarray, list[str]]:
        """Copies of the stored rows and labels (unordered)."""
        return self._X[: self._size].copy(), self._labels[: self._size]
