"""The state of one source partition in scale-out mode, and the record a replica publishes for it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from service.core.batch import tp_key
from service.core.recent_rows import RecentRows
from service.core.state import LearnerState


class PartitionState:
    """The state of one source partition, as owned (or last owned) by this replica.

    Beside the learner state it carries ``forget_named``: how many distinct ids the forget
    requests it applied named in all (the merger turns the partitions' per-partition unknown counts
    into one global count with it; ``service.roles.forget_view``). The control-topic offsets it
    applied live in ``state.offsets`` beside the event offset, so both travel in one record.
    """

    def __init__(self, partition: int, state: LearnerState, recent: RecentRows, seq: int = 0,
                 forget_named: int = 0) -> None:
        self.partition = partition
        self.state = state
        self.recent = recent
        self.seq = seq  # of the last record published for this partition, by anyone
        self.forget_named = forget_named
        self.changed = False

    def next_offset(self, topic: str) -> int | None:
        """The offset of the next event of this partition to learn (None: nothing handled yet)."""
        return self.state.offsets.get(tp_key(topic, self.partition))

    def payload(self, topic: str, replica_id: str) -> dict[str, Any]:
        """The record value (before ``pack``): the whole cumulative state plus provenance."""
        X, labels = self.recent.rows()
        return {**self.state.state_dict(), "partition": self.partition,
                "next_offset": self.next_offset(topic) or 0, "seq": self.seq, "replica": replica_id,
                "published_at": time.time(), "recent": {"X": X, "labels": labels},
                "forget_named": self.forget_named}

    def drop_recent_label(self, label: str) -> None:
        """Remove a forgotten label's rows from the recent rows (the gates' window travels in the record)."""
        _, labels = self.recent.rows()
        self._keep_recent([i for i, lab in enumerate(labels) if lab != label])

    def drop_recent_rows(self, forgotten: np.ndarray, atol: float = 1e-5) -> None:
        """Remove recent rows equal (within ``atol``: re-embedded texts) to a row of ``forgotten``."""
        X, _ = self.recent.rows()
        if not len(X) or not len(forgotten):
            return
        self._keep_recent([i for i, row in enumerate(X)
                           if not np.any(np.all(np.abs(forgotten - row) <= atol, axis=1))])

    def _keep_recent(self, keep: list[int]) -> None:
        X, labels = self.recent.rows()
        if len(keep) == len(labels):
            return
        self.recent = RecentRows(self.recent.capacity, X.shape[1])
        if keep:
            self.recent.extend(X[keep], [labels[i] for i in keep])
