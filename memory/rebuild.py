"""Rebuild a head from the replay memory, for when a head's settings change and its statistics cannot load.

A head's statistics depend on settings such as ridge's ``expansion_width`` and ``seed`` (they fix
the feature map), so a snapshot taken under other settings cannot be loaded into the new head.
The replay memory keeps raw embeddings, which every head kind can learn from: the rebuilt head has
learned exactly the stored items (a class-balanced sample of the stream, not all of it).
"""

from __future__ import annotations

from typing import Any

from learner.heads import make_head
from learner.heads.stats import ExactHead
from memory.replay import ReplayMemory

CHUNK = 4096  # rows per learn_many call: bounds the float64 feature block (CHUNK x (M + 1))


def rebuild_head(memory: ReplayMemory, kind: str, params: dict[str, Any]) -> ExactHead:
    """A new ``make_head(kind, **params)`` that has learned every stored item of ``memory``, oldest first.

    Raises ``ValueError`` for an unknown kind or bad parameters (as ``make_head``). An empty
    memory gives an untrained head. The memory is only read.
    """
    head = make_head(kind, **params)
    X, labels, _ = memory.all()
    for start in range(0, len(X), CHUNK):
        head.learn_many(X[start:start + CHUNK], labels[start:start + CHUNK])
    return head
