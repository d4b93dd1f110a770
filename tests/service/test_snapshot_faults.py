"""A disk that cannot take snapshots pauses learning, is reported, and heals by itself (issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service import metrics
from service.core.batch import Record, learn_batch
from service.core.events import encode
from service.core.snapshots import SnapshotStore
from service.core.state import new_state
from service.roles.snapshots import RetryBackoff, Snapshotter
from tests.helpers import wait_for


class NoDeadLetters:
    def flush(self) -> None:
        pass


class RecordingConsumer:
    """The two consumer calls the snapshotter makes: its assignment and the offset commit."""

    def __init__(self) -> None:
        self.commits: list[dict] = []

    def assignment(self) -> set:
        from kafka import TopicPartition

        return {TopicPartition("t", 0)}

    def commit(self, offsets: dict) -> None:
        self.commits.append({tp.partition: meta.offset for tp, meta in offsets.items()})


def test_a_failed_write_blocks_reports_and_retries_until_the_disk_is_back(tmp_path: Path) -> None:
    blocker = tmp_path / "disk"
    blocker.write_text("a file where the snapshot folder should be: every write fails with an OSError")
    consumer = RecordingConsumer()
    snaps = Snapshotter(SnapshotStore(blocker / "checkpoints"), consumer, NoDeadLetters(),  # type: ignore[arg-type]
                        every_events=1, every_seconds=0.0, max_backoff_s=0.2)
    state = new_state("ncm", {}, None, window=10, backbone_identity="bb")
    learn_batch(state, [Record("t", 0, 0, encode("e0", "a", features=np.ones(4).tolist()))], embed=None, dim=4,
                max_event_bytes=10_000)
    before = metrics.SNAPSHOT_FAILURES._value.get()
    try:
        assert snaps.snapshot(state, "periodic") is False
        assert snaps.blocked and "snapshot write failed" in (snaps.failure or "")
        assert "snapshot" in metrics.faults() and consumer.commits == []  # nothing committed past it
        wait_for(lambda: not snaps.retry_if_due(state) and metrics.SNAPSHOT_FAILURES._value.get() >= before + 2,
                 timeout=5, message="a second failed try")
        blocker.unlink()  # the disk is writable again
        wait_for(lambda: snaps.retry_if_due(state), timeout=5, message="a successful retry")
    finally:
        snaps.close()
    assert not snaps.blocked and "snapshot" not in metrics.faults()
    assert consumer.commits == [{0: 1}]
    restored = SnapshotStore(blocker / "checkpoints").latest()
    assert restored is not None and restored["counters"]["learned"] == 1


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = RetryBackoff(max_seconds=3.0, first=0.5)
    assert [backoff.failed() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert not backoff.due()
    backoff.reset()
    assert backoff.due() and backoff.failed() == 0.5


def test_a_failed_export_is_counted_reported_and_retried_while_the_old_model_serves(tmp_path: Path) -> None:
    import shutil

    from service.core.recent_rows import RecentRows
    from service.models.exporter import Exporter
    from service.models.registry import ModelRegistry
    from service.models.served import ModelSlot
    from service.roles.exports import ExportPolicy, ExportScheduler

    registry, slot = ModelRegistry(tmp_path / "models", keep=3), ModelSlot()
    exporter = Exporter(registry=registry, slot=slot, backbone=None, backbone_identity="bb", head_kind="ncm",
                        parity_tolerance=1e-4, max_accuracy_drop=0.5)
    exports = ExportScheduler(exporter, ExportPolicy(every_events=1, every_seconds=0.0, gcv_every_seconds=1e9))
    state = new_state("ncm", {}, None, window=10, backbone_identity="bb")
    rng = np.random.default_rng(0)
    recs = [Record("t", 0, i, encode(f"e{i}", "ab"[i % 2], features=rng.normal(size=4).tolist())) for i in range(6)]
    learn_batch(state, recs[:4], embed=None, dim=4, max_event_bytes=10_000)
    before = metrics.EXPORT_FAILURES._value.get()
    try:
        assert exports.export_now(state, RecentRows(8, 4)) == 1
        shutil.rmtree(tmp_path / "models")
        (tmp_path / "models").write_text("the registry's disk is gone")
        learn_batch(state, recs[4:], embed=None, dim=4, max_event_bytes=10_000)
        exports.note_learned(2, changed=True, new_class=True, received_at=0.0)  # urgent: no budget wait
        exports.maybe_export(state, RecentRows(8, 4), backlog=False)
        exports.collect(state, wait=True)
        assert metrics.EXPORT_FAILURES._value.get() == before + 1 and "export" in metrics.faults()
        assert slot.version == 1  # the old model keeps serving
        (tmp_path / "models").unlink()
        (tmp_path / "models").mkdir()

        def exported() -> bool:
            exports.maybe_export(state, RecentRows(8, 4), backlog=False)  # waits out the backoff
            return exports.collect(state, wait=True) is not None

        wait_for(exported, timeout=5, message="a retried export")
    finally:
        exports.close(state)
    assert slot.version == 2 and "export" not in metrics.faults()
