"""Crash and resume as an ordinary unit test: snapshot, lose everything after it, replay, compare."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.batch import Record, learn_batch
from service.core.events import encode
from service.core.snapshots import pack, unpack
from service.core.state import new_state
from service.errors import BackboneUnavailable

DIM = 8
PARAMS = {"lam": 1.0, "expansion_width": 16, "seed": 0, "temperature": 0.05}


def records(n: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 7 == 3:
            value = b"not json"
        elif i % 11 == 5:
            value = encode(f"e-{i - 1}", "c0", features=rng.normal(size=DIM))  # a producer retry: same id
        else:
            value = encode(f"e-{i}", f"c{i % 3}", features=rng.normal(size=DIM))
        out.append(Record("t", i % 2, i, value))
    return out


def fresh():
    return new_state("ridge", PARAMS, None, window=1000, backbone_identity="test")


def run(state, recs, batch: int):
    letters = []
    for i in range(0, len(recs), batch):
        letters += learn_batch(state, recs[i : i + batch], embed=None, dim=DIM, max_event_bytes=10_000).dead_letters
    return letters


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 119), st.integers(1, 40), st.integers(1, 40))
def test_resume_from_any_snapshot_equals_an_uninterrupted_run(cut, batch_a, batch_b):
    recs = records(120)
    reference = fresh()
    run(reference, recs, 25)

    crashed = fresh()
    run(crashed, recs[:cut], batch_a)
    snapshot = pack(crashed.state_dict())
    run(crashed, recs[cut:], batch_b)  # work after the snapshot, lost in the crash

    resumed = fresh()
    resumed.restore(unpack(snapshot))
    # The consumer seeks to the snapshot's offsets, but redelivering earlier records is harmless too.
    run(resumed, recs[max(cut - 10, 0):], batch_b)

    got = resumed.head.statistics()
    for key, want in reference.head.statistics().items():
        if key == "classes":
            np.testing.assert_array_equal(got[key], want)
        else:
            np.testing.assert_allclose(got[key], want, rtol=1e-12, atol=0)
    assert resumed.head.counts() == reference.head.counts()
    assert resumed.counters == reference.counters
    assert resumed.offsets == reference.offsets


def test_bad_records_become_dead_letters_and_still_advance_offsets():
    state = fresh()
    letters = run(state, records(30), 10)
    assert [dl.reason for dl in letters] == ["not_json"] * 4
    assert state.offsets == {"t:0": 29, "t:1": 30}  # next offsets: records 0..29 alternate partitions
    assert state.counters.duplicates == 3  # records 5, 16 and 27 repeat the previous id
    assert state.counters.learned == 30 - 4 - 3


def test_a_backbone_that_cannot_load_leaves_the_state_untouched():
    """Stopping mid-export must not advance offsets past text it never learned (nor dead-letter it)."""
    def unavailable(texts):
        raise BackboneUnavailable("the backbone was not loaded before shutdown")

    state = fresh()
    run(state, records(20), 20)
    before = pack(state.state_dict())
    batch = [Record("t", 0, 100, encode("txt-1", "c1", text="hello")),
             Record("t", 1, 101, encode("f-1", "c2", features=np.ones(DIM)))]
    with pytest.raises(BackboneUnavailable):
        learn_batch(state, batch, embed=unavailable, dim=DIM, max_event_bytes=10_000)
    assert pack(state.state_dict()) == before
    # A text the encoder rejects is still the text's fault: dead-lettered, the batch goes on.
    out = learn_batch(state, batch, embed=lambda texts: (_ for _ in ()).throw(ValueError("bad")), dim=DIM,
                      max_event_bytes=10_000)
    assert [d.reason for d in out.dead_letters] == ["embed_failed"] and out.learned == 1
    assert state.offsets["t:0"] == 101 and state.offsets["t:1"] == 102
