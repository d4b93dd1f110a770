"""The id window behind idempotency and forgetting, against a plain reference model."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.state import IdWindow

OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 30), st.integers(0, 3), st.sampled_from("abc")),
    st.tuples(st.just("discard"), st.integers(0, 30)),
), max_size=120)


def reference(capacity: int, ops: list[tuple]) -> dict[str, tuple[int, int, str]]:
    """Live ids, oldest insertion first: inserted within the last ``capacity`` insertions, not discarded since.

    Adding an id that is live only updates its location and label; adding it otherwise inserts it.
    """
    insertions = 0
    inserted_at: dict[str, int] = {}
    value: dict[str, tuple[int, int, str]] = {}
    for n, op in enumerate(ops):
        if op[0] == "add":
            event_id = f"e{op[1]}"
            if capacity == 0:
                continue
            live = event_id in inserted_at and inserted_at[event_id] >= insertions - capacity
            if not live:
                inserted_at[event_id] = insertions
                insertions += 1
            value[event_id] = (op[2], n, op[3])
        else:
            inserted_at.pop(f"e{op[1]}", None)
    live_ids = sorted((at, i) for i, at in inserted_at.items() if at >= insertions - capacity)
    return {i: value[i] for _, i in live_ids}


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 8), OPS)
def test_window_remembers_the_last_insertions_minus_discards(capacity, ops):
    window = IdWindow(capacity)
    for n, op in enumerate(ops):
        if op[0] == "add":
            window.add(f"e{op[1]}", op[2], n, op[3])
        else:
            window.discard([f"e{op[1]}"])
    want = reference(capacity, ops)
    assert len(window) == len(want)
    for event_id, (partition, offset, label) in want.items():
        assert event_id in window and window.locate(event_id) == (partition, offset)
        assert event_id in window.ids_with_label(label)
    state = window.state_dict()
    assert state["ids"] == [i for i in want]  # oldest first
    again = IdWindow.from_state_dict(state)
    assert again.state_dict()["ids"] == state["ids"]
    assert [again.locate(i) for i in want] == [window.locate(i) for i in want]
    smaller = IdWindow.from_state_dict(state, capacity=2)
    assert smaller.state_dict()["ids"] == state["ids"][-2:]


def test_a_full_window_snapshots_without_walking_python_tuples():
    window = IdWindow(200_000)
    for i in range(250_000):
        window.add(f"event-{i:09d}", i % 6, i, f"class-{i % 77}")
    start = time.perf_counter()
    state = window.state_dict()
    seconds = time.perf_counter() - start
    assert state["ids"][0] == "event-000050000" and len(state["ids"]) == 200_000
    assert state["locations"][-1] == (249_999 % 6) << 40 | 249_999
    assert seconds < 1.0, f"{seconds:.2f} s to capture 200,000 ids"


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 6), before=st.integers(0, 15), after=st.integers(0, 15))
def test_a_restored_window_goes_on_exactly_like_one_never_snapshotted(capacity, before, after):
    live, restored = IdWindow(capacity), None
    for i in range(before):
        live.add(f"e{i}", i % 2, i, f"c{i % 3}")
    restored = IdWindow.from_state_dict(live.state_dict())
    for i in range(before, before + after):  # the ring wraps past the restored slots
        live.add(f"e{i}", i % 2, i, f"c{i % 3}")
        restored.add(f"e{i}", i % 2, i, f"c{i % 3}")
    a, b = live.state_dict(), restored.state_dict()
    assert a["ids"] == b["ids"] and a["locations"].tolist() == b["locations"].tolist()
    assert [a["labels"][c] for c in a["label_codes"]] == [b["labels"][c] for c in b["label_codes"]]
    assert all(restored.locate(i) == live.locate(i) for i in a["ids"])
