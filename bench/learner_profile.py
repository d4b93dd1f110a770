"""Where a feature event's time goes in the learner: µs per event for poll, decode, head, memory, other.

    .venv/bin/python bench/learner_profile.py [--events 24000] [--classes 50] [--bootstrap HOST:PORT]

Produces ``--events`` feature events (384-d JSON arrays, ``--classes`` classes, synthetic
clusters) to a fresh topic on a real broker, reads them back with a bare kafka-python consumer
(``poll``: its µs per message), then runs them through ``learn_batch`` in the daemon's batches of
512 with the daemon's default state (ridge M=2048 with lambda by GCV, replay memory of 20,000,
error compensation), timing each part by wrapping it:

- ``decode``: ``service.core.events.decode`` (parse and validate one message);
- ``head``: ``head.learn_many``;
- ``memory``: ``ReplayMemory.add``;
- ``predict``: prequential scoring, by a frozen copy of the head (stands in for the served model);
- ``other``: the rest of ``learn_batch`` (dedupe, id window, compensation, stacking).

Rounds alternate the serial path (everything on one thread: the stage costs add up to ``wall``)
and the learn loop's pipelined path (the head's update on a worker thread, ``HeadAhead``, so its
math overlaps the rest: ``wall`` is less than the sum). Kafka's poll is not in ``wall``: the
daemon polls on the learner thread too, so add it. Writes ``bench/results/learner_profile.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import limit_blas_threads, machine_info  # noqa: E402

BATCH = 512
DIM = 384


def synthetic(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` unit-norm 384-d rows around ``classes`` random centres, labels in a random order."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, DIM))
    y = rng.integers(0, classes, n)
    X = centres[y] + 0.8 * rng.standard_normal((n, DIM))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), [f"class-{c}" for c in y]


def poll_all(bootstrap: str, topic: str, n: int) -> tuple[list[Any], float]:
    """Every message of ``topic`` read by a bare consumer; (messages, µs per message from the first)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    msgs: list[Any] = []
    t0 = 0.0
    deadline = time.monotonic() + 120
    first = 0
    while len(msgs) < n and time.monotonic() < deadline:
        got = [m for batch in consumer.poll(timeout_ms=1000, max_records=1 << 30).values() for m in batch]
        if got and not msgs:
            t0, first = time.perf_counter(), len(got)
        msgs += got
    seconds = time.perf_counter() - t0
    consumer.close()
    if len(msgs) < n:
        raise RuntimeError(f"read {len(msgs)} of {n} messages")
    return msgs, 1e6 * seconds / max(len(msgs) - first, 1)


class Timer:
    """Wraps callables, summing their wall time (nested wrappers are not subtracted)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.seconds.setdefault(name, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


def profile(records: list[Any], warm: int, *, pipelined: bool = False) -> dict[str, float]:
    """µs per event of each part of ``learn_batch`` over ``records`` after ``warm`` events.

    ``pipelined``: the head's updates run on the learn loop's worker (``HeadAhead``), overlapping
    the rest; ``head`` is then time on the worker and ``wall`` is what counts.
    """
    import service.core.batch as batch
    from service.app import wiring
    from service.app.config import Settings
    from service.core.state import new_state

    s = Settings()
    state = new_state(s.head.kind, wiring.head_params(s.head), wiring.build_memory(s),
                      window=s.kafka.dedupe_window, backbone_identity="", errors=wiring.build_error_memory(s))
    batch.learn_batch(state, records[:warm], embed=None, dim=DIM, max_event_bytes=s.kafka.max_event_bytes)
    served = copy.deepcopy(state.head.readout())  # the solved model, frozen: like the served one

    def predict(X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return served.predict_proba(X.astype(np.float64)), list(served.classes)

    timer = Timer()
    real_decode = batch.decode
    batch.decode = timer.wrap("decode", real_decode)
    state.head.learn_many = timer.wrap("head", state.head.learn_many)
    assert state.memory is not None
    state.memory.add = timer.wrap("memory", state.memory.add)
    timed_predict = timer.wrap("predict", predict)
    kwargs: dict[str, Any] = {}
    if pipelined:
        from service.roles.head_ahead import HeadAhead

        kwargs["head_updates"] = ahead = HeadAhead()
    t0 = time.perf_counter()
    try:
        for i in range(warm, len(records), BATCH):
            batch.learn_batch(state, records[i:i + BATCH], embed=None, dim=DIM,
                              max_event_bytes=s.kafka.max_event_bytes, predict=timed_predict, **kwargs)
        if pipelined:
            ahead.settle()
    finally:
        batch.decode = real_decode
        if pipelined:
            ahead.close()
    total = time.perf_counter() - t0
    n = len(records) - warm
    us = {k: 1e6 * v / n for k, v in timer.seconds.items()}
    if not pipelined:
        us["other"] = 1e6 * total / n - sum(us.values())
    us["wall"] = 1e6 * total / n
    return us


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=24_000)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--warm", type=int, default=4_096, help="events learned before timing (memory fills)")
    parser.add_argument("--bootstrap", default=os.environ.get("EDDY_TEST_BOOTSTRAP", "127.0.0.1:19092"))
    parser.add_argument("--rounds", type=int, default=2, help="alternating serial / pipelined rounds")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="sys.setswitchinterval for the run (the daemon's GIL hand-over period)")
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "learner_profile.json")
    args = parser.parse_args(argv)
    limit_blas_threads(1)  # the daemon's head.blas_threads default
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    from bench.throughput import produce
    from service.core.batch import Record
    from service.core.events import encode

    X, y = synthetic(args.events, args.classes)
    topic = f"bench-profile-{uuid.uuid4().hex[:8]}"
    produce(args.bootstrap, topic, [encode(f"p-{i}", y[i], features=X[i]) for i in range(args.events)])
    msgs, poll_us = poll_all(args.bootstrap, topic, args.events)
    now = time.time()
    records = [Record(m.topic, m.partition, m.offset, m.value, tuple(m.headers or ()), now) for m in msgs]
    runs: dict[str, list[dict[str, float]]] = {"serial": [], "pipelined": []}
    for _ in range(args.rounds):  # alternating, so load drift hits both
        for mode in runs:
            runs[mode].append(profile(records, args.warm, pipelined=mode == "pipelined"))
    med = {mode: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for mode, rs in runs.items()}
    load = os.getloadavg()
    print(f"µs per event over {args.events - args.warm} events ({args.classes} classes), median of {args.rounds} "
          f"rounds; bare kafka-python poll {poll_us:.1f}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"  {'':<10}" + "".join(f"{k:>9}" for k in med["serial"]))
    for mode, us in med.items():
        print(f"  {mode:<10}" + "".join(f"{us[k]:9.1f}" if k in us else f"{'-':>9}" for k in med["serial"]))
    doc: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc[args.label or "latest"] = {"us_per_event": {"poll": poll_us, **med["serial"]},
                                   "pipelined_us_per_event": med["pipelined"], "rounds": runs,
                                   "events": args.events, "warm": args.warm, "classes": args.classes,
                                   "load_average": load, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
