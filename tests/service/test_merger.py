"""The merger keeps the newest state of each partition and its merge equals one learner over everything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from learner.heads import make_head
from service.core.batch import Record, learn_batch
from service.core.events import encode
from service.core.recent_rows import RecentRows
from service.core.snapshots import SnapshotStore, pack
from service.core.state import LearnerState, new_state
from service.kafka.deltas import DeltaBook, DeltaRecord, parse_record
from service.roles.merger import MergeOptions, Merger
from service.roles.replica import PartitionState
from service.tools.state_report import describe_state

DIM = 8
PARAMS = {"lam": 0.5, "expansion_width": 16, "seed": 3, "temperature": "auto"}


def _events(n: int, seed: int) -> list[tuple[str, np.ndarray, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = f"c{rng.integers(0, 4)}"
        x = rng.normal(size=DIM).astype(np.float32)
        out.append((label, x, encode(f"s{seed}-{i}", label, features=x.tolist())))
    return out


def _state() -> LearnerState:
    return new_state("ridge", PARAMS, None, window=1000, backbone_identity="bb")


def _published(partition: int, events: list[tuple[str, np.ndarray, bytes]], upto: int, seq: int) -> DeltaRecord:
    """The record a replica would publish after learning ``events[:upto]`` of ``partition``."""
    part = PartitionState(partition, _state(), RecentRows(16, DIM), seq=seq)
    records = [Record("ev", partition, i, raw) for i, (_, _, raw) in enumerate(events[:upto])]
    out = learn_batch(part.state, records, embed=None, dim=DIM, max_event_bytes=1 << 20)
    if out.X is not None:
        part.recent.extend(out.X, out.labels)
    return DeltaRecord(f"ev:{partition}", upto, seq, pack(part.payload("ev", "r1")))


def _merger(tmp_path: Path) -> Merger:
    options = MergeOptions(source_topic="ev", deltas_topic="d", head_kind="ridge",
                           head_hyperparameters=make_head("ridge", **PARAMS).hyperparameters(),
                           backbone_identity="bb", export_every_seconds=0.1, snapshot_every_seconds=1.0,
                           holdout_size=64, poll_timeout_ms=10, log_every_seconds=5.0)
    return Merger(consumer=None, exporter=None, store=SnapshotStore(tmp_path), options=options)  # type: ignore[arg-type]


def test_merge_of_partition_states_equals_one_head_over_all_events(tmp_path: Path) -> None:
    parts = {p: _events(40 + 7 * p, seed=p) for p in range(3)}
    merger = _merger(tmp_path)
    for p, events in parts.items():
        assert merger.offer(_published(p, events, len(events) // 2, seq=1))
        assert merger.offer(_published(p, events, len(events), seq=2))
    reference = make_head("ridge", **PARAMS)
    for events in parts.values():
        reference.learn_many(np.stack([x for _, x, _ in events]), [label for label, _, _ in events])
    merged = merger.merged_head().statistics()
    expected = reference.statistics()
    assert list(merged["classes"]) == list(expected["classes"])
    assert np.array_equal(merged["counts"], expected["counts"])
    for key in ("gram", "Q"):
        np.testing.assert_allclose(merged[key], expected[key], rtol=1e-12, atol=1e-12)
    assert merger.counters()["learned"] == sum(len(e) for e in parts.values())
    assert merger.offsets() == {f"ev:{p}": len(e) for p, e in parts.items()}


def test_a_stale_state_never_replaces_a_newer_one(tmp_path: Path) -> None:
    events = _events(30, seed=9)
    merger = _merger(tmp_path)
    assert merger.offer(_published(0, events, 30, seq=5))
    assert not merger.offer(_published(0, events, 10, seq=9))  # a zombie's older state, later seq
    assert not merger.offer(_published(0, events, 30, seq=5))  # a replay of the same record
    assert merger.counters()["learned"] == 30


def test_snapshot_is_readable_by_eddy_state(tmp_path: Path) -> None:
    events = _events(25, seed=1)
    merger = _merger(tmp_path)
    merger.offer(_published(2, events, 25, seq=1))
    merger.merge_now()
    merger.snapshot()
    report = describe_state(tmp_path, export_stats=tmp_path / "stats.npz")
    assert report["events_learned"] == 25
    assert report["offsets"] == {"ev:2": 25}
    assert sum(report["per_class_counts"].values()) == 25


def test_records_without_headers_are_ignored_and_book_keeps_the_highest_rank() -> None:
    assert parse_record(b"ev:0", b"x", []) is None
    record = parse_record(b"ev:0", b"x", [("eddy.next_offset", b"7"), ("eddy.seq", b"2")])
    assert record is not None and record.rank == (7, 2)
    book = DeltaBook()
    assert book.offer(record)
    assert not book.offer(DeltaRecord("ev:0", 7, 1, b"y"))
    assert book.offer(DeltaRecord("ev:0", 8, 0, b"z"))


@pytest.mark.parametrize("bad", [{"expansion_width": 32}, {"seed": 4}])
def test_a_state_learned_with_other_hyperparameters_is_refused(tmp_path: Path, bad: dict) -> None:
    merger = _merger(tmp_path)
    part = PartitionState(0, new_state("ridge", {**PARAMS, **bad}, None, window=10, backbone_identity="bb"),
                          RecentRows(4, DIM))
    assert not merger.offer(DeltaRecord("ev:0", 1, 1, pack(part.payload("ev", "r"))))
