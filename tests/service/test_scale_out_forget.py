"""Forget requests in scale-out mode, in process: per-partition application, exactly once, one unknown count.

The learner side is the real ``ControlFollower.apply`` on real partition states, with events
re-read from an in-memory copy of the topic; the merger is the real ``Merger`` (no exporter).
The end-to-end version with a broker and SIGKILLs is ``tests/integration/test_scale_out_forget.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from learner.heads import make_head
from service.core.batch import Record, learn_batch
from service.core.events import encode
from service.core.forget import ForgetRequest, parse_control
from service.core.recent_rows import RecentRows
from service.core.snapshots import SnapshotStore, pack
from service.core.state import new_state
from service.kafka.clients import ensure_topics
from service.kafka.control import ControlPublisher, control_message
from service.kafka.deltas import DeltaRecord
from service.models.exporter import Exporter
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot
from service.roles.control import ControlFollower, ControlOptions
from service.roles.forget_view import settled_unknown
from service.roles.merger import MergeOptions, Merger
from service.roles.partitions import PartitionState
from service.serving.admin import DaemonAdmin
from tests.helpers import consume

DIM = 8
PARAMS = {"lam": 0.5, "expansion_width": 16, "seed": 3, "temperature": "auto"}
CONTROL = "ctl"


def _topic(n_partitions: int = 3, per_partition: int = 40) -> dict[int, list[tuple[str, str, np.ndarray, bytes]]]:
    """(id, label, x, raw) per partition; ids are unique across partitions."""
    rng = np.random.default_rng(5)
    out: dict[int, list[tuple[str, str, np.ndarray, bytes]]] = {}
    for p in range(n_partitions):
        rows = []
        for i in range(per_partition):
            event_id, label = f"p{p}-{i}", f"c{rng.integers(0, 3)}"
            x = rng.normal(size=DIM).astype(np.float32)
            rows.append((event_id, label, x, encode(event_id, label, features=x.tolist())))
        out[p] = rows
    return out


def _learned(topic: dict, p: int) -> PartitionState:
    part = PartitionState(p, new_state("ridge", PARAMS, None, window=1000, backbone_identity="bb"), RecentRows(16, DIM))
    records = [Record("ev", p, i, raw) for i, (_, _, _, raw) in enumerate(topic[p])]
    out = learn_batch(part.state, records, embed=None, dim=DIM, max_event_bytes=1 << 20)
    assert out.X is not None
    part.recent.extend(out.X, out.labels)
    return part


def _follower(topic: dict) -> ControlFollower:
    by_location = {(p, i): raw for p, rows in topic.items() for i, (_, _, _, raw) in enumerate(rows)}

    def refetch(locations):  # what KafkaRefetcher returns for the events topic
        return {loc: by_location[loc] for loc in locations if loc in by_location}

    return ControlFollower(None, dlq=None, refetch=refetch, embed=None,  # type: ignore[arg-type]
                           options=ControlOptions(CONTROL, DIM, 1 << 20))


def _merger(tmp_path: Path) -> Merger:
    options = MergeOptions(source_topic="ev", deltas_topic="d", head_kind="ridge",
                           head_hyperparameters=make_head("ridge", **PARAMS).hyperparameters(),
                           backbone_identity="bb", export_every_seconds=0.1, snapshot_every_seconds=1.0,
                           holdout_size=64, poll_timeout_ms=10, log_every_seconds=5.0, control_topic=CONTROL)
    return Merger(consumer=None, exporter=None, store=SnapshotStore(tmp_path), options=options)  # type: ignore[arg-type]


def _publish(part: PartitionState, merger: Merger) -> bool:
    part.seq += 1
    return merger.offer(DeltaRecord(f"ev:{part.partition}", part.next_offset("ev") or 0, part.seq,
                                    pack(part.payload("ev", "r"))))


def _control_record(offset: int, body: dict) -> Record:
    return Record(CONTROL, 0, offset, json.dumps({"forget": body}).encode())


def test_a_forget_is_applied_once_per_partition_and_merges_to_never_seen(tmp_path: Path, caplog) -> None:
    topic = _topic()
    parts = {p: _learned(topic, p) for p in topic}
    merger = _merger(tmp_path)
    for part in parts.values():
        assert _publish(part, merger)
    # The newest event of another label in each partition: its row is among the recent rows.
    ids = [next(i for i, label, _, _ in reversed(topic[p]) if label != "c1") for p in topic] + ["ghost-a", "ghost-b"]
    gone = set(ids) | {i for rows in topic.values() for i, label, _, _ in rows if label == "c1"}
    forgotten_rows = np.stack([x for rows in topic.values() for i, _, x, _ in rows if i in gone])
    assert all(any(np.all(forgotten_rows == row, axis=1).any() for row, label in zip(*part.recent.rows(), strict=True)
                   if label != "c1") for part in parts.values())
    follower = _follower(topic)
    request = _control_record(0, {"ids": ids, "label": "c1"})

    assert follower.apply(request, list(parts.values())) == 1
    assert follower.apply(request, list(parts.values())) == 0  # already applied everywhere: nothing happens
    assert all(part.state.offsets[f"{CONTROL}:0"] == 1 and part.forget_named == len(ids) for part in parts.values())
    assert all("c1" not in part.recent.rows()[1] for part in parts.values())
    for part in parts.values():  # the published record keeps no row of a forgotten event
        X, _ = part.recent.rows()
        assert len(X) and not any(np.all(forgotten_rows == row, axis=1).any() for row in X)

    assert _publish(parts[0], merger) and _publish(parts[1], merger)
    merger.merge_now()
    assert merger.counters()["forget_unknown"] == 0  # partition 2 has not applied it yet: not settled
    assert _publish(parts[2], merger)
    with caplog.at_level(logging.INFO, logger="eddy.audit"):
        merger.merge_now()
        merger.merge_now()
    audit = [r.getMessage() for r in caplog.records if r.name == "eddy.audit"]
    assert audit == [f"forget requests up to control offsets {{'{CONTROL}:0': 1}} applied in all 3 partitions: "
                     f"{len(gone) - 2} events forgotten, 2 named ids found in none (totals)"]
    assert merger.counters()["forgotten"] == len(gone) - 2
    assert merger.counters()["forget_unknown"] == 2  # the two ghosts, once (each partition missed 4 ids)

    reference = make_head("ridge", **PARAMS)
    kept = [(label, x) for rows in topic.values() for i, label, x, _ in rows if i not in gone]
    reference.learn_many(np.stack([x for _, x in kept]), [label for label, _ in kept])
    merged, expected = merger.merged_head().statistics(), reference.statistics()
    assert list(merged["classes"]) == list(expected["classes"]) == ["c0", "c2"]
    assert np.array_equal(merged["counts"], expected["counts"])
    for key in ("gram", "Q", "sums"):
        np.testing.assert_allclose(merged[key], expected[key], rtol=1e-9, atol=1e-9)


def test_a_partition_restored_from_its_record_applies_only_what_follows_its_control_offset() -> None:
    topic = _topic(n_partitions=1)
    part = _learned(topic, 0)
    follower = _follower(topic)
    follower.apply(_control_record(0, {"ids": [topic[0][0][0]]}), [part])
    payload = part.payload("ev", "r")  # published with the first forget and control offset 1
    restored = PartitionState(0, new_state("ridge", PARAMS, None, window=1000, backbone_identity="bb"),
                              RecentRows(16, DIM), forget_named=int(payload["forget_named"]))
    restored.state.restore(payload)
    for offset, body in enumerate([{"ids": [topic[0][0][0]]}, {"ids": [topic[0][1][0]]}]):
        follower.apply(_control_record(offset, body), [restored])  # the follower re-reads from the start
    assert restored.state.counters.forgotten == 2
    assert restored.state.counters.forget_unknown == 0
    assert restored.forget_named == 2
    assert restored.state.offsets[f"{CONTROL}:0"] == 2


def test_invalid_control_records_move_the_offset_and_are_not_counted() -> None:
    topic = _topic(n_partitions=1)
    part = _learned(topic, 0)
    sent = []

    class Letters:
        def send(self, value, **fields):
            sent.append(fields["reason"])

    follower = _follower(topic)
    follower.dlq = Letters()  # type: ignore[assignment]
    assert follower.apply(Record(CONTROL, 0, 0, b"not json"), [part]) == 1
    assert part.state.offsets[f"{CONTROL}:0"] == 1 and part.changed and sent == ["bad_control"]
    assert part.state.counters.forgotten == 0 and part.forget_named == 0


def test_settled_unknown_needs_every_partition_at_the_same_control_offsets() -> None:
    def state(offset: int, named: int, unknown: int) -> dict:
        return {"offsets": {"ev:0": 10, f"{CONTROL}:0": offset}, "forget_named": named,
                "counters": {"forget_unknown": unknown}}

    assert settled_unknown({0: state(2, 10, 7), 1: state(2, 10, 5)}, CONTROL, 2) == 2  # 12 - 1 * 10
    assert settled_unknown({0: state(2, 10, 7), 1: state(1, 4, 3)}, CONTROL, 2) is None
    assert settled_unknown({0: state(2, 10, 7)}, CONTROL, 2) is None  # partition 1 never published


def test_control_message_round_trips_through_parse_control() -> None:
    for request in (ForgetRequest(("a", "b")), ForgetRequest(label="x"), ForgetRequest(("a",), "x")):
        assert parse_control(control_message(request)) == request
    with pytest.raises(ValueError):
        control_message(ForgetRequest())


def test_admin_forget_without_a_learner_publishes_to_the_control_topic_once(kafka_bootstrap, topic_name, tmp_path,
                                                                             caplog) -> None:
    control = f"{topic_name}.control"
    ensure_topics(kafka_bootstrap, {control: 1})
    publisher = ControlPublisher(kafka_bootstrap, control)
    admin = DaemonAdmin(ModelRegistry(tmp_path / "models", keep=2), ModelSlot(), None, learner=lambda: None,
                        forget_publisher=publisher)
    try:
        with caplog.at_level(logging.INFO, logger="eddy.audit"):
            reply = asyncio.run(admin.forget(["e-1", "e-2"], None))
    finally:
        publisher.close()
    assert reply["published"] == f"{control}:0@0" and reply["forgotten"] == 0
    assert [r.getMessage() for r in caplog.records if r.name == "eddy.audit"] == [
        f"forget request published to {control}:0@0 by Admin/Forget: ids=2 label=None"]
    assert [parse_control(m.value) for m in consume(kafka_bootstrap, control, 1)] == [ForgetRequest(("e-1", "e-2"))]


def test_the_merger_exports_the_forgotten_label_away(tmp_path: Path) -> None:
    topic = _topic()
    parts = {p: _learned(topic, p) for p in topic}
    slot = ModelSlot()
    exporter = Exporter(registry=ModelRegistry(tmp_path / "models", keep=3), slot=slot, backbone=None,
                        backbone_identity="bb", head_kind="ridge", parity_tolerance=1e-4, max_accuracy_drop=0.0)
    merger = _merger(tmp_path)
    merger.exporter = exporter
    for part in parts.values():
        _publish(part, merger)
    assert merger.merge_now() == 1
    assert "c1" in slot.get().classes  # type: ignore[union-attr]
    follower = _follower(topic)
    follower.apply(_control_record(0, {"label": "c1"}), list(parts.values()))
    for part in parts.values():
        _publish(part, merger)
    assert merger.merge_now() == 2
    assert sorted(slot.get().classes) == ["c0", "c2"]  # type: ignore[union-attr]
