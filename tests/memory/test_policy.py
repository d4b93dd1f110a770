"""The pure admission/eviction rules of the replay memory."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.policy import (
    choose_evictions,
    class_targets,
    items_for_bytes,
    reservoir_decision,
    trim_counts,
)


def test_equal_split_gives_the_remainder_to_the_first_seen_classes() -> None:
    targets = class_targets({"b": 100, "a": 100, "c": 100}, 10)
    assert targets == {"b": 4, "a": 3, "c": 3}
    assert list(targets) == ["b", "a", "c"]


def test_a_small_class_keeps_everything_and_lends_the_rest() -> None:
    assert class_targets({"big": 1000, "tiny": 2, "mid": 1000}, 30) == {"big": 14, "tiny": 2, "mid": 14}


def test_all_fits_when_capacity_exceeds_what_was_seen() -> None:
    assert class_targets({"a": 3, "b": 5}, 100) == {"a": 3, "b": 5}


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="capacity"):
        class_targets({"a": 1}, -1)
    with pytest.raises(ValueError, match="seen counts"):
        class_targets({"a": -1}, 5)
    with pytest.raises(ValueError, match="seen_in_class"):
        reservoir_decision(0, 5, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="recency_weight"):
        reservoir_decision(1, 5, 0, np.random.default_rng(0), recency_weight=1.5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=0, max_size=12), st.integers(0, 2000))
def test_targets_are_water_filled(seen_list: list[int], capacity: int) -> None:
    seen = {f"c{i}": v for i, v in enumerate(seen_list)}
    targets = class_targets(seen, capacity)
    assert list(targets) == list(seen)
    assert sum(targets.values()) == min(capacity, sum(seen.values()))
    assert all(0 <= targets[c] <= seen[c] for c in seen)
    # Balanced: a class below the largest target is below it only because it has nothing more.
    top = max(targets.values(), default=0)
    assert all(targets[c] >= top - 1 or targets[c] == seen[c] for c in seen)


def test_reservoir_admits_while_there_is_room_and_rejects_at_zero_target() -> None:
    rng = np.random.default_rng(0)
    assert reservoir_decision(5, 10, 4, rng) == "admit"
    assert reservoir_decision(5, 0, 0, rng) == "reject"


def _run_reservoir(n: int, target: int, rng: np.random.Generator, recency_weight: float = 0.0) -> list[int]:
    stored: list[int] = []
    for i in range(n):
        d = reservoir_decision(i + 1, target, len(stored), rng, recency_weight)
        if d == "admit":
            stored.append(i)
        elif d == "replace":
            stored[int(rng.integers(len(stored)))] = i
    return stored


def test_every_event_of_a_class_is_kept_with_equal_probability() -> None:
    n, target, trials = 100, 10, 1500
    rng = np.random.default_rng(7)
    hits = np.zeros(n)
    for _ in range(trials):
        hits[_run_reservoir(n, target, rng)] += 1
    freq = hits / trials  # each should be target / n = 0.1; binomial sd ~ 0.0077
    assert abs(freq.mean() - 0.1) < 1e-9
    assert np.abs(freq - 0.1).max() < 0.04
    assert abs(freq[:50].mean() - freq[50:].mean()) < 0.01  # no bias towards early or late events


def test_recency_weight_one_keeps_a_window_of_recent_events() -> None:
    rng = np.random.default_rng(1)
    runs = [_run_reservoir(1000, 10, rng, recency_weight=1.0) for _ in range(50)]
    assert all(999 in stored for stored in runs)  # the newest event is always stored
    ages = 999 - np.array(runs)
    assert 5 < ages.mean() < 15  # geometric survival (1 - 1/10) per event: mean age ~ 10


def test_recency_weight_biases_towards_recent_events() -> None:
    rng = np.random.default_rng(3)
    plain = np.mean([np.mean(_run_reservoir(300, 20, rng)) for _ in range(100)])
    recent = np.mean([np.mean(_run_reservoir(300, 20, rng, recency_weight=0.2)) for _ in range(100)])
    assert recent > plain + 30


def test_trim_counts_and_evictions() -> None:
    assert trim_counts({"a": 10, "b": 3}, {"a": 6, "b": 6}) == {"a": 4}
    rng = np.random.default_rng(0)
    picked = choose_evictions(np.arange(100, 110), 4, rng)
    assert len(set(picked.tolist())) == 4 and set(picked.tolist()) <= set(range(100, 110))
    assert len(choose_evictions(np.arange(5), 0, rng)) == 0
    with pytest.raises(ValueError, match="cannot evict 6 of 5"):
        choose_evictions(np.arange(5), 6, rng)


def test_items_for_bytes() -> None:
    assert items_for_bytes(10_000, 100.0) == 100
    assert items_for_bytes(10_000, 100.0, fixed_bytes=500) == 95
    assert items_for_bytes(50, 100.0) == 0
    with pytest.raises(ValueError, match="bytes_per_item"):
        items_for_bytes(10, 0)


def _class_targets_reference(seen: dict[str, int], capacity: int) -> dict[str, int]:
    """The original (quadratic) definition, kept as the oracle for the vectorised one."""
    targets = dict.fromkeys(seen, 0)
    open_classes, remaining = list(seen), capacity
    while open_classes:
        share, extra = divmod(remaining, len(open_classes))
        quota = {c: share + (1 if i < extra else 0) for i, c in enumerate(open_classes)}
        small = [c for c in open_classes if seen[c] <= quota[c]]
        if not small:
            targets.update(quota)
            break
        for c in small:
            targets[c] = seen[c]
            remaining -= seen[c]
        open_classes = [c for c in open_classes if c not in set(small)]
    return targets


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=0, max_size=60), st.integers(0, 1500))
def test_targets_equal_the_original_definition(seen_list: list[int], capacity: int) -> None:
    # Small counts and many classes make ties at share and share + 1 common: the hard cases.
    seen = {f"c{i}": v for i, v in enumerate(seen_list)}
    assert class_targets(seen, capacity) == _class_targets_reference(seen, capacity)


def test_targets_equal_the_original_definition_on_random_large_inputs() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(1, 3000))
        counts = rng.geometric(rng.uniform(0.01, 0.9), size=n) - 1
        seen = {f"c{i}": int(v) for i, v in enumerate(counts)}
        capacity = int(rng.integers(0, 2 * int(counts.sum()) + 2))
        assert class_targets(seen, capacity) == _class_targets_reference(seen, capacity)
