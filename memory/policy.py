"""Pure admission and eviction rules of the replay memory: class-balanced reservoir sampling.

The memory holds at most ``capacity`` items. Capacity is shared between the classes seen so far
(first-seen order) by *water-filling*: every class is entitled to an equal share
``capacity // n_classes`` (the first ``capacity % n_classes`` classes get one more), a class that
has seen fewer events than its share keeps all of them, and what it leaves unused is shared again
among the others. Once every class has seen at least its share, this is exactly
``capacity // n_classes (+1)``; before that, no slot is wasted on a class that cannot fill it.

Within a class the memory is a reservoir (Vitter's Algorithm R, driven by the class's own seen
count): when the class is at its target, the ``n``-th event of the class replaces a uniformly
chosen stored item with probability ``target / n``, so every event of the class seen so far is
equally likely to be stored. When a class's target shrinks (a new class appears), the memory
evicts uniformly at random inside that class, which keeps the sample uniform.

Optional recency weighting (``recency_weight`` = w in [0, 1]): an event that Algorithm R would
reject still replaces a random stored item of its class with probability w. w = 0 is the plain
uniform reservoir. With w > 0 a stored item survives each later event of its class with
probability about ``1 - w / target``, so old items fade out geometrically: w = 1 stores every event
and keeps an exponentially-weighted window whose mean age is ~``target`` events of the class;
values in between mix the uniform sample with that window, which helps under drift.

Everything here is a pure function of its arguments and the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

Decision = Literal["admit", "replace", "reject"]


def class_targets(seen: Mapping[str, int], capacity: int) -> dict[str, int]:
    """Per-class capacity by water-filling, in the mapping's (first-seen) order.

    ``seen`` maps each class to how many of its events could be stored (events seen, or items
    stored when sampling from the memory); iteration order is the tie-break order for the
    ``capacity % n`` extra slots. Returns a target per class with ``target <= seen`` and
    ``sum(targets) == min(capacity, sum(seen))``. Raises ``ValueError`` on negative inputs.

    Cost: the replay memory calls this for every event of a new class once it is full, so it is
    vectorised: each round is O(open classes) in numpy, and there are at most about two rounds per
    distinct seen count (issue 14: the per-element ``set`` rebuild made 20k classes cost 14 s an
    event). One-event classes, the hostile case, take two rounds.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    counts = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
    if (counts < 0).any():
        raise ValueError(f"seen counts must be >= 0, got {dict(seen)}")
    return dict(zip(seen, water_fill(counts, capacity).tolist(), strict=True))


def water_fill(seen: np.ndarray, capacity: int) -> np.ndarray:
    """``class_targets`` on an int64 array of non-negative counts (order = tie-break order).

    Each round gives the open classes an equal share (the first ``remaining % open`` one more);
    classes that cannot fill their share keep what they have and leave the round, the rest share
    what is left. Within a round the share only grows from the last, so a round that removes no
    class is the last.
    """
    targets = np.zeros(len(seen), dtype=np.int64)
    open_idx = np.arange(len(seen))  # open classes, in tie-break order
    remaining = capacity
    while len(open_idx):
        share, extra = divmod(remaining, len(open_idx))
        counts = seen[open_idx]
        quota = np.full(len(open_idx), share, dtype=np.int64)
        quota[:extra] += 1
        small = counts <= quota
        if not small.any():  # every open class can fill its quota
            targets[open_idx] = quota
            break
        targets[open_idx[small]] = counts[small]  # these keep everything; the rest share what is left
        remaining -= int(counts[small].sum())
        open_idx = open_idx[~small]
    return targets


def reservoir_decision(seen_in_class: int, target: int, stored_in_class: int, rng: np.random.Generator,
                       recency_weight: float = 0.0) -> Decision:
    """Decide the fate of the ``seen_in_class``-th event of its class (1-based, this event included).

    ``admit``: there is room in the class (``stored_in_class < target``), store it.
    ``replace``: store it in place of a uniformly chosen stored item of the same class.
    ``reject``: do not store it. Draws from ``rng`` only when the class is full.
    """
    if seen_in_class < 1:
        raise ValueError(f"seen_in_class counts this event, so must be >= 1, got {seen_in_class}")
    if not 0.0 <= recency_weight <= 1.0:
        raise ValueError(f"recency_weight must be in [0, 1], got {recency_weight}")
    if stored_in_class < target:
        return "admit"
    if target <= 0:
        return "reject"
    # Algorithm R: keep with probability target / seen (j uniform in [0, seen)).
    if int(rng.integers(0, seen_in_class)) < target:
        return "replace"
    if recency_weight > 0.0 and float(rng.random()) < recency_weight:
        return "replace"
    return "reject"


def trim_counts(stored: Mapping[str, int], targets: Mapping[str, int]) -> dict[str, int]:
    """How many items each class must lose to fit its target (only classes over target appear)."""
    return {c: n - targets.get(c, 0) for c, n in stored.items() if n > targets.get(c, 0)}


def choose_evictions(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct items drawn uniformly from ``candidates`` (1-d), without replacement."""
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot evict {n} of {len(candidates)} items")
    return rng.choice(candidates, size=n, replace=False) if n else candidates[:0]


def items_for_bytes(max_bytes: int, bytes_per_item: float, fixed_bytes: int = 0) -> int:
    """How many items fit in ``max_bytes`` given a per-item cost and a fixed overhead (>= 0)."""
    if bytes_per_item <= 0:
        raise ValueError(f"bytes_per_item must be > 0, got {bytes_per_item}")
    return max(0, int((max_bytes - fixed_bytes) // bytes_per_item))
