"""The pipelined learner: the head's update on a worker thread changes nothing but when it runs."""

import threading

import numpy as np
import pytest

from memory import ReplayMemory
from service.core.batch import learn_batch
from service.core.state import new_state
from service.roles.head_ahead import HeadAhead
from tests.service.test_batch_resume import DIM, PARAMS, records


def state_with_memory():
    memory = ReplayMemory(DIM, max_items=30, seed=1, use_gpu="never")
    return new_state("ridge", PARAMS, memory, window=1000, backbone_identity="test")


def learn(recs, batch, head_updates=None):
    state = state_with_memory()
    kwargs = {} if head_updates is None else {"head_updates": head_updates}
    outs = [learn_batch(state, recs[i:i + batch], embed=None, dim=DIM, max_event_bytes=10_000, **kwargs)
            for i in range(0, len(recs), batch)]
    if head_updates is not None:
        head_updates.settle()
    return state, outs


@pytest.mark.parametrize("batch", [1, 7, 50])
def test_pipelined_updates_give_the_serial_state(batch):
    recs = records(300, seed=4)
    serial, serial_outs = learn(recs, batch)
    ahead = HeadAhead()
    try:
        piped, piped_outs = learn(recs, batch, ahead)
    finally:
        ahead.close()
    a, b = serial.head.statistics(), piped.head.statistics()
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert piped.offsets == serial.offsets and vars(piped.counters) == vars(serial.counters)
    assert piped.memory.all()[2] == serial.memory.all()[2]
    assert [o.new_classes for o in piped_outs] == [o.new_classes for o in serial_outs]
    assert [len(o.dead_letters) for o in piped_outs] == [len(o.dead_letters) for o in serial_outs]


def test_start_returns_while_the_head_learns_and_settle_waits_for_it():
    state = state_with_memory()
    release, started = threading.Event(), threading.Event()
    real = state.head.learn_many

    def slow_learn(X, labels):
        started.set()
        assert release.wait(10)
        real(X, labels)

    state.head.learn_many = slow_learn
    ahead = HeadAhead()
    try:
        out = learn_batch(state, records(20), embed=None, dim=DIM, max_event_bytes=10_000, head_updates=ahead)
        assert started.wait(10)
        # learn_batch returned with the update still running: the rest of the state already holds the batch.
        assert out.learned > 0 and state.counters.learned == out.learned and len(state.window) == out.learned
        assert state.head.statistics()["counts"].sum() == 0
        release.set()
        ahead.settle()
        assert state.head.statistics()["counts"].sum() == out.learned
    finally:
        release.set()
        ahead.close()


def test_a_failed_update_is_raised_by_settle_on_the_callers_thread():
    state = state_with_memory()

    def broken(X, labels):
        raise FloatingPointError("singular update")

    state.head.learn_many = broken
    ahead = HeadAhead()
    try:
        learn_batch(state, records(20), embed=None, dim=DIM, max_event_bytes=10_000, head_updates=ahead)
        with pytest.raises(FloatingPointError, match="singular update"):
            ahead.settle()
        ahead.settle()  # raised once; nothing in flight any more
    finally:
        ahead.close()
