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

    def rows(self) -> tuple[np.ndarray, list[str]]:
        """Copies of the stored rows and labels (unordered)."""
        return self._X[: self._size].copy(), self._labels[: self._size]
