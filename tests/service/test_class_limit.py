"""``head.max_classes``: a new label past the limit is a dead letter, known labels keep learning."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.batch import Record, learn_batch
from service.core.events import encode
from service.core.state import new_state

DIM = 8
PARAMS = {"lam": 1.0, "expansion_width": 16, "seed": 0, "temperature": 0.05}


def labelled(labels: list[str], start: int = 0) -> list[Record]:
    rng = np.random.default_rng(start)
    return [Record("t", 0, start + i, encode(f"e-{start + i}", label, features=rng.normal(size=DIM)))
            for i, label in enumerate(labels)]


def fresh():
    return new_state("ridge", PARAMS, None, window=100_000, backbone_identity="test")


def test_new_labels_past_the_limit_are_dead_lettered_with_their_reason() -> None:
    state = fresh()
    out = learn_batch(state, labelled(["a", "b", "c", "a", "d", "b"]), embed=None, dim=DIM,
                      max_event_bytes=10_000, max_classes=2)
    assert list(state.head.classes_) == ["a", "b"]
    assert out.learned == 4  # a, b, a, b
    assert [(d.record.offset, d.reason) for d in out.dead_letters] == [(2, "too_many_classes"),
                                                                      (4, "too_many_classes")]
    assert "head.max_classes is 2" in out.dead_letters[0].detail
    assert state.counters.dead_lettered == 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=80), st.integers(1, 12), st.integers(1, 20))
def test_the_limit_holds_across_batches_and_admits_in_arrival_order(codes, limit, batch) -> None:
    labels = [f"c{c}" for c in codes]
    state = fresh()
    letters = 0
    for i in range(0, len(labels), batch):
        out = learn_batch(state, labelled(labels[i:i + batch], start=i), embed=None, dim=DIM,
                          max_event_bytes=10_000, max_classes=limit)
        letters += len(out.dead_letters)
    first_seen = list(dict.fromkeys(labels))
    assert list(state.head.classes_) == first_seen[:limit]
    assert letters == sum(1 for y in labels if y not in first_seen[:limit])
